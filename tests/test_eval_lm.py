"""FLORES-style language-modelling scores on hand-checkable cases and against a direct computation."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fidellm.errors import FidelError
from fidellm.eval.lm import score_documents, score_lines, token_bits
from fidellm.models.llama import LlamaForCausalLM
from fidellm.models.load import load_checkpoint_model, load_model
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.train.checkpoint import latest_checkpoint, save_checkpoint
from fixtures.models import ScriptedLM, gqa_config

LINES = ["ሰላም ለዓለም።", "ኢትዮጵያ በአፍሪካ ቀንድ የምትገኝ ሀገር ናት።", "a", "ab cd", "ቡና"]


class Uniform(ScriptedLM):
    """Predicts every one of `vocab` ids with equal probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)


def test_uniform_over_bytes_is_exactly_8_bits_per_byte():
    scores = score_lines(Uniform(256), ByteTokenizer(), LINES, "cpu", batch_size=2)
    assert scores.bits_per_byte == pytest.approx(8.0, abs=1e-12)
    n_bytes = sum(len(line.encode()) for line in LINES)
    assert scores.bits_per_char == pytest.approx(8.0 * n_bytes / sum(map(len, LINES)))
    # the cut for byte models: the bytes of line[:len(line)//2]
    second = [8.0 * (len(line.encode()) - len(line[: len(line) // 2].encode())) for line in LINES]
    assert scores.second_half_bits == pytest.approx(sum(second) / len(LINES), abs=1e-9)


def _tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = gqa_config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        head_dim=8,
        max_position_embeddings=128,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config).eval()


def test_batched_padded_bits_equal_one_line_at_a_time():
    model = _tiny_model()
    tok = ByteTokenizer()
    sequences = [tok.encode(line) for line in LINES]
    batched = token_bits(model, sequences, tok.bos_id, "cpu", batch_size=8)
    for seq, bits in zip(sequences, batched, strict=True):
        ids = torch.tensor([[tok.bos_id, *seq]])
        logits = model(ids[:, :-1]).logits[0]
        expected = F.cross_entropy(logits, ids[0, 1:], reduction="none") / math.log(2)
        assert torch.allclose(torch.from_numpy(bits).float(), expected, atol=1e-5)


class Bigram(ScriptedLM):
    """Next-token logits from the current token alone, with a declared context of `context` positions:
    windowing cannot change its predictions, so windowed and unwindowed bits must be identical."""

    def __init__(self, vocab: int, context: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)
        self.config = type("Config", (), {"max_position_embeddings": context})()

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise AssertionError(f"{input_ids.shape[1]} positions exceed the context")
        return self.table(input_ids)


@pytest.mark.parametrize("length", [5, 16, 17, 40, 101])
def test_sliding_window_scores_every_token_once_in_place(length: int):
    tok = ByteTokenizer()
    seq = list(("ሀለሐመሠረሰሸቀበ" * 20).encode())[:length]
    windowed = token_bits(Bigram(256, 16), [seq, seq[:3]], tok.bos_id, "cpu", batch_size=3)
    whole = token_bits(Bigram(256, 1000), [seq, seq[:3]], tok.bos_id, "cpu")  # same weights, no window
    assert [len(b) for b in windowed] == [length, 3]
    np.testing.assert_allclose(windowed[0], whole[0], rtol=0, atol=1e-12)
    assert (windowed[0] > 0).all()


def test_sliding_window_on_a_transformer_keeps_the_first_window_exact():
    model = _tiny_model()  # context 128
    seq = list(("ኢትዮጵያ " * 40).encode())[:300]
    windowed = token_bits(model, [seq], ByteTokenizer().bos_id, "cpu")[0]
    first = token_bits(model, [seq[:128]], ByteTokenizer().bos_id, "cpu")[0]
    np.testing.assert_allclose(windowed[:128], first, atol=1e-5)
    scores = score_lines(model, ByteTokenizer(), ["ሀ" * 100, "ለ"], "cpu")
    assert scores.windowed_lines == 1 and scores.tokens == 303


def test_empty_lines_are_skipped_and_counted():
    scores = score_lines(Uniform(256), ByteTokenizer(), ["", "ab", ""], "cpu")
    assert scores.lines == 1 and scores.empty_lines == 2 and scores.bits_per_byte == pytest.approx(8.0)
    with pytest.raises(FidelError, match="no lines"):
        score_lines(Uniform(256), ByteTokenizer(), [], "cpu")
    with pytest.raises(FidelError, match="every line is empty"):
        score_lines(Uniform(256), ByteTokenizer(), ["", ""], "cpu")


def test_documents_of_a_uniform_byte_model_cost_8_bits_per_byte():
    docs = ["ሰላም ለዓለም።\nሁለተኛ መስመር", "short", ""]
    scores = score_documents(Uniform(256), ByteTokenizer(), docs, "cpu")
    assert scores.documents == 2 and scores.bits_per_byte == pytest.approx(8.0, abs=1e-12)
    assert scores.bits_per_char == pytest.approx(8.0 * scores.bytes / scores.chars)
    with pytest.raises(FidelError, match="no documents"):
        score_documents(Uniform(256), ByteTokenizer(), [""], "cpu")


def test_documents_by_source_score_as_each_source_alone():
    model = _tiny_model(seed=1)
    docs = ["ሰላም ለዓለም።", "ቡና ጣፋጭ ነው።\nሁለተኛ መስመር", "", "abc ሀለ", "ኢትዮጵያ " * 9]
    sources = ["news", "books", "news", "tweets", "news"]
    scores = score_documents(model, ByteTokenizer(), docs, "cpu", sources=sources)
    assert list(scores.by_source) == ["books", "news", "tweets"]  # the empty news document is skipped
    assert [e["documents"] for e in scores.by_source.values()] == [1, 2, 1]
    total_bits = 0.0
    for source, entry in scores.by_source.items():
        own = [doc for doc, label in zip(docs, sources, strict=True) if label == source]
        alone = score_documents(model, ByteTokenizer(), own, "cpu")
        assert entry["bits_per_byte"] == pytest.approx(alone.bits_per_byte, rel=1e-6)
        assert entry["bytes"] == alone.bytes
        total_bits += entry["bits_per_byte"] * entry["bytes"]
    assert total_bits / scores.bytes == pytest.approx(scores.bits_per_byte, rel=1e-9)
    assert score_documents(model, ByteTokenizer(), docs, "cpu").by_source == {}
    with pytest.raises(FidelError, match="2 sources for 5 documents"):
        score_documents(model, ByteTokenizer(), docs, "cpu", sources=["a", "b"])


def test_checkpoint_model_scores_like_the_trained_one(tmp_path):
    model = _tiny_model(seed=3)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"data": {}, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(tmp_path, 7, model, optimizer, state, keep_last=1)
    loaded = load_checkpoint_model(latest_checkpoint(tmp_path))
    tok = ByteTokenizer()
    assert score_lines(loaded, tok, LINES, "cpu") == score_lines(model, tok, LINES, "cpu")
    run = tmp_path / "run"
    save_checkpoint(run / "train" / "checkpoints", 9, model, optimizer, state, keep_last=1)
    from_run, tokenizer_dir = load_model(run)
    assert tokenizer_dir == run / "tokenizer"
    assert score_lines(from_run, tok, LINES, "cpu") == score_lines(model, tok, LINES, "cpu")
    with pytest.raises(FidelError, match="no model here"):
        load_model(tmp_path / "empty")


def test_checkpoint_tokenizer_is_the_nearest_one_above_from_any_path(tmp_path, monkeypatch):
    """A relative checkpoint path with few parents (`sft/step_7`, `.`) finds RUN/sft/tokenizer; with none
    above, the error names the checkpoint and the folders searched."""
    model = _tiny_model(seed=3)
    state = {"data": {}, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(tmp_path / "sft", 7, model, torch.optim.AdamW(model.parameters()), state, keep_last=1)
    checkpoint = latest_checkpoint(tmp_path / "sft")
    tokenizer = tmp_path / "sft" / "tokenizer"
    monkeypatch.chdir(tmp_path)
    relative = checkpoint.relative_to(tmp_path)
    searched = re.escape(
        f"{relative}: no tokenizer for this checkpoint; looked for a tokenizer/ directory in"
    )
    with pytest.raises(FidelError, match=rf"^{searched} {re.escape(str(tmp_path.resolve() / 'sft'))}, "):
        load_model(relative)
    tokenizer.mkdir()
    assert load_model(relative)[1] == tokenizer.resolve()
    monkeypatch.chdir(checkpoint)
    assert load_model(".")[1] == tokenizer.resolve()
