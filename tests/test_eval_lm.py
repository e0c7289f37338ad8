"""FLORES-style language-modelling scores on hand-checkable cases and against a direct computation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fidellm.errors import FidelError
from fidellm.eval.lm import score_lines, token_bits
from fidellm.models.llama import LlamaForCausalLM, LMOutput
from fidellm.models.load import load_checkpoint_model, load_model
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.train.checkpoint import latest_checkpoint, save_checkpoint
from fixtures.models import gqa_config

LINES = ["ሰላም ለዓለም።", "ኢትዮጵያ በአፍሪካ ቀንድ የምትገኝ ሀገር ናት።", "a", "ab cd", "ቡና"]


class Uniform(nn.Module):
    """Predicts every one of `vocab` ids with equal probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        return LMOutput(torch.zeros(*input_ids.shape, self.vocab))


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


def test_line_longer_than_context_is_an_error():
    model = _tiny_model()
    with pytest.raises(FidelError, match="context"):
        score_lines(model, ByteTokenizer(), ["ሀ" * 100], "cpu")
    with pytest.raises(FidelError, match="no lines"):
        score_lines(model, ByteTokenizer(), [], "cpu")


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
