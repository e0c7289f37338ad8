"""Row batches that merge and shrink between steps (continuous batching): every row decodes exactly as
it would alone, whatever joins or leaves its batch, and the padded cache never outgrows the longest row."""

from __future__ import annotations

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.generate import GenerationConfig, generate
from fidellm.generate.batch import DecodeBatch, DecodeRow, new_rows
from fidellm.models.llama import LlamaForCausalLM, pad_vocab
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fixtures.models import gqa_config, random_llama


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    return train_bpe(lines[:400], vocab_size=512, show_progress=False)


@pytest.fixture(scope="module")
def model(tokenizer: BPETokenizer) -> LlamaForCausalLM:
    config = gqa_config(vocab_size=pad_vocab(tokenizer.vocab_size), num_hidden_layers=2)
    torch.set_num_threads(1)
    return random_llama(config, seed=3, random_norms=False)


PROMPTS = ["ሰላም", "የኢትዮጵያ ዋና ከተማ አዲስ አበባ ናት።", "ሰኞ እለት፣ በስታንፎርድ ዩኒቨርሲቲ", "ዛሬ"]
CONFIGS = [
    GenerationConfig(max_new_tokens=14, temperature=0, stop_token_ids=()),
    GenerationConfig(max_new_tokens=9, temperature=0.8, seed=5, stop_token_ids=()),
    GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=9, stop_token_ids=()),
    GenerationConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.3, stop_token_ids=()),
]


def rows_for(model, tokenizer, index: int) -> list[DecodeRow]:
    ids = tokenizer.encode(PROMPTS[index], add_bos=True)
    return new_rows(model, tokenizer, [ids], CONFIGS[index], owner=index)


def alone(model, tokenizer, index: int) -> list[int]:
    return generate(model, tokenizer, [PROMPTS[index]], CONFIGS[index])[0].token_ids


def test_rows_joining_and_leaving_decode_as_alone(model, tokenizer) -> None:
    """Row 0 starts alone; rows 1 and 2 join after 3 and 5 steps, row 3 after 8; finished rows are
    dropped after every step. Each row's tokens equal its solo run (greedy and seeded sampling, each
    with its own settings), and after every drop the cache is exactly as wide as its longest row."""
    running = DecodeBatch(model, tokenizer, rows_for(model, tokenizer, 0))
    running.step()
    arrivals, results, widths_ok = {3: [1, 2], 8: [3]}, {}, True
    for step in range(1, 40):
        running.step()
        for index in arrivals.get(step, []):
            joining = DecodeBatch(model, tokenizer, rows_for(model, tokenizer, index))
            joining.step()
            running.merge(joining)
        for row in running.rows:
            if row.finished:
                results[row.owner] = row.result.token_ids
        live = [i for i, row in enumerate(running.rows) if not row.finished]
        if not live:
            break
        running.keep(live)
        longest = max(len(r.prompt_ids) + len(r.result.token_ids) for r in running.rows)
        widths_ok &= running.mask.shape[1] == longest and running.cache[0].k.shape[2] == longest - 1
    assert sorted(results) == [0, 1, 2, 3]
    assert widths_ok
    for index in range(4):
        assert results[index] == alone(model, tokenizer, index), f"row {index} changed by its neighbours"


def test_merging_two_unequal_batches_and_keeping_a_middle_row(model, tokenizer) -> None:
    first = DecodeBatch(model, tokenizer, rows_for(model, tokenizer, 1) + rows_for(model, tokenizer, 2))
    second = DecodeBatch(model, tokenizer, rows_for(model, tokenizer, 0))
    first.step(), second.step()
    first.merge(second)
    assert [row.owner for row in first.rows] == [1, 2, 0]
    first.keep([1])  # row 2 (the longest prompt) stays
    while not first.done:
        first.step()
    assert first.rows[0].result.token_ids == alone(model, tokenizer, 2)


def test_reshaping_needs_stepped_kv_batches(model, tokenizer) -> None:
    fresh = DecodeBatch(model, tokenizer, rows_for(model, tokenizer, 0))
    assert not fresh.reshapable
    with pytest.raises(FidelError, match="stepped batches"):
        fresh.keep([0])
    fresh.step()
    with pytest.raises(FidelError, match="at least one row"):
        fresh.keep([])
    with pytest.raises(FidelError, match="at least one row"):
        DecodeBatch(model, tokenizer, [])


@pytest.mark.parametrize("columns", [1, 3, 64])
def test_prompts_fed_in_parts_decode_as_fed_whole(model, tokenizer, columns: int) -> None:
    """Chunked prefill: the left-padded prompts (three lengths) fed `columns` at a time, the last column
    always left to the first step, give every row the tokens of its solo run."""
    batch = DecodeBatch(model, tokenizer, [r for i in (1, 2, 0) for r in rows_for(model, tokenizer, i)])
    width = batch.prompt_left
    assert width == max(len(tokenizer.encode(PROMPTS[i], add_bos=True)) for i in (0, 1, 2)) > 3
    while batch.prompt_left > 1:
        before = batch.prompt_left
        batch.prefill_part(columns)
        assert batch.prompt_left == max(1, before - columns)
        assert batch.cache[0].k.shape[2] == width - batch.prompt_left and not batch.reshapable
    while not batch.done:
        batch.step()
    assert batch.prompt_left == 0 and not batch.chunkable
    for row in batch.rows:
        assert row.result.token_ids == alone(model, tokenizer, row.owner), f"row {row.owner} changed"
    with pytest.raises(FidelError, match="not yet stepped"):
        batch.prefill_part(1)
