"""The generation engine: cached = full-forward logits on padded batches, greedy, seeds, filters, stops."""

from __future__ import annotations

import math

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.generate import GenerationConfig, generate, stream_generate
from fidellm.generate.engine import left_pad
from fidellm.generate.sampling import apply_repetition_penalty, top_k_filter, top_p_filter
from fidellm.models.llama import LlamaForCausalLM, pad_vocab
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fixtures.models import gqa_config, random_llama


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    """A 512-id BPE trained on FLORES dev (real Amharic, so prompts are realistic token sequences)."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    return train_bpe(lines, vocab_size=512, show_progress=False)


def make_model(vocab_size: int, max_positions: int = 128, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer GQA model with large weights (so differences cannot hide), fp32, eval mode."""
    config = gqa_config(
        vocab_size=pad_vocab(vocab_size),
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
    )
    return random_llama(config, seed, random_norms=False)


@pytest.fixture(scope="module")
def model(tokenizer: BPETokenizer) -> LlamaForCausalLM:
    return make_model(tokenizer.vocab_size)


PROMPTS = ["ሰላም", "የኢትዮጵያ ዋና ከተማ አዲስ አበባ ናት።", "ሰኞ እለት፣ በስታንፎርድ"]


def test_cached_padded_batch_logits_equal_full_forward(model: LlamaForCausalLM) -> None:
    """Every step of left-padded cached decoding gives each row the logits of its own unpadded forward."""
    prompts = [[0, 17, 300, 45, 9], [0, 250, 12, 77, 401, 5, 6, 33, 99], [0, 42]]
    ids, mask = left_pad(prompts, pad_id=1, device=torch.device("cpu"))
    assert mask.sum(1).tolist() == [5, 9, 2]
    cache, sequences, worst = model.new_cache(), [list(p) for p in prompts], 0.0
    step_input = ids
    with torch.no_grad():
        for _ in range(12):
            logits = model(step_input, cache=cache, attention_mask=mask).logits[:, -1]
            for row, seq in enumerate(sequences):
                full = model(torch.tensor([seq])).logits[0, -1]
                worst = max(worst, (logits[row] - full).abs().max().item())
            chosen = logits.argmax(-1)
            for row, token in enumerate(chosen.tolist()):
                sequences[row].append(token)
            step_input = chosen[:, None]
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    assert worst <= 1e-5, worst


def test_padding_changes_nothing_but_missing_mask_would(model: LlamaForCausalLM) -> None:
    """The mask matters: without it, the padded row's logits differ (so the test above can fail)."""
    ids, mask = left_pad([[0, 5, 6, 7], [0, 9]], pad_id=1, device=torch.device("cpu"))
    with torch.no_grad():
        alone = model(torch.tensor([[0, 9]])).logits[0, -1]
        masked = model(ids, attention_mask=mask).logits[1, -1]
        unmasked = model(ids).logits[1, -1]
    assert (masked - alone).abs().max().item() <= 1e-5
    assert (unmasked - alone).abs().max().item() > 1e-3


def test_greedy_is_argmax_of_full_forward_and_deterministic(model, tokenizer) -> None:
    config = GenerationConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=())
    results = generate(model, tokenizer, PROMPTS, config)
    assert results == generate(model, tokenizer, PROMPTS, config)
    for result in results:
        assert result.finish_reason == "length" and len(result.token_ids) == 10
        seq = result.prompt_ids + result.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0]
        expected = logits[len(result.prompt_ids) - 1 : -1, : tokenizer.vocab_size].argmax(-1).tolist()
        assert result.token_ids == expected
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_seeds_repeat_and_differ_and_rows_are_independent(model, tokenizer) -> None:
    def sample(prompts: list[str], seed: int) -> list[list[int]]:
        config = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=seed, stop_token_ids=())
        return [r.token_ids for r in generate(model, tokenizer, prompts, config)]

    first = sample(PROMPTS, seed=7)
    assert first == sample(PROMPTS, seed=7)
    assert first != sample(PROMPTS, seed=8)
    assert first[0] != first[1] or PROMPTS[0] != PROMPTS[1]
    # Row i of a batch uses seed + i: it equals that prompt alone with seed 7 + i.
    assert sample([PROMPTS[2]], seed=9)[0] == first[2]
    same_prompt = sample([PROMPTS[0], PROMPTS[0]], seed=3)
    assert same_prompt[0] != same_prompt[1]


def test_top_k_one_and_tiny_top_p_equal_greedy(model, tokenizer) -> None:
    greedy = generate(
        model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0.0, stop_token_ids=())
    )
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        config = GenerationConfig(max_new_tokens=8, temperature=1.5, seed=1, stop_token_ids=(), **extra)
        sampled = generate(model, tokenizer, PROMPTS, config)
        assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy], extra


def test_logits_processors_on_hand_made_numbers() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    penalized = apply_repetition_penalty(logits, seen, 2.0)
    assert penalized.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    assert top_k_filter(logits, 2).tolist() == [[2.0, -math.inf, -math.inf, 3.0]]
    # softmax of [2, -1, 0.5, 3]: 0.2525, 0.0126, 0.0563, 0.6786 -> 3.0 alone holds < 0.9, 3.0 + 2.0 >= 0.9
    assert top_p_filter(logits, 0.9).tolist() == [[2.0, -math.inf, -math.inf, 3.0]]
    assert top_p_filter(logits, 0.5).tolist() == [[-math.inf, -math.inf, -math.inf, 3.0]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_changes_greedy_output(model, tokenizer) -> None:
    base = GenerationConfig(max_new_tokens=20, temperature=0.0, stop_token_ids=())
    plain = generate(model, tokenizer, PROMPTS, base)
    strong = generate(
        model,
        tokenizer,
        PROMPTS,
        GenerationConfig(max_new_tokens=20, temperature=0.0, stop_token_ids=(), repetition_penalty=50.0),
    )
    for result in strong:  # a huge penalty on positive logits: no seen token with a positive logit wins
        assert len(set(result.token_ids)) >= len(result.token_ids) // 2
    assert [r.token_ids for r in plain] != [r.token_ids for r in strong]


def test_stop_strings_cut_exactly(model, tokenizer) -> None:
    free = generate(
        model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=30, temperature=0.0, stop_token_ids=())
    )
    for prompt, result in zip(PROMPTS, free, strict=True):
        text = result.text
        assert len(text) >= 6, text
        stop = text[3:5]  # a piece that occurs in the greedy continuation; cut at its first occurrence
        config = GenerationConfig(
            max_new_tokens=30, temperature=0.0, stop_token_ids=(), stop_strings=("@@@", stop)
        )
        cut = generate(model, tokenizer, [prompt], config)[0]
        assert cut.finish_reason == "stop" and cut.stop == stop
        assert cut.text == text[: text.index(stop)]
        assert cut.token_ids == result.token_ids[: len(cut.token_ids)]
        assert "".join(stream_generate(model, tokenizer, prompt, config)) == cut.text


def test_stop_token_sets_finish_reason(model, tokenizer) -> None:
    free = generate(
        model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=())
    )
    stop_id = free[0].token_ids[4]
    first = free[0].token_ids.index(stop_id)
    config = GenerationConfig(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop_id,))
    result = generate(model, tokenizer, PROMPTS[:1], config)[0]
    assert result.finish_reason == "stop" and result.stop == stop_id
    assert result.token_ids == free[0].token_ids[: first + 1]
    assert result.text == tokenizer.decode(free[0].token_ids[:first], skip_special_tokens=True)


def test_batch_rows_finish_independently(model, tokenizer) -> None:
    free = generate(
        model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0.0, stop_token_ids=())
    )
    stop_id = free[1].token_ids[2]
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_id,))
    results = generate(model, tokenizer, PROMPTS, config)
    for free_row, row in zip(free, results, strict=True):
        n = free_row.token_ids.index(stop_id) + 1 if stop_id in free_row.token_ids else 12
        assert row.token_ids == free_row.token_ids[:n]
        assert row.finish_reason == ("stop" if stop_id in free_row.token_ids else "length")


def test_stream_generate_joins_to_generate_text(model, tokenizer) -> None:
    config = GenerationConfig(max_new_tokens=25, temperature=0.9, seed=4, stop_token_ids=())
    chunks = list(stream_generate(model, tokenizer, PROMPTS[1], config))
    assert "".join(chunks) == generate(model, tokenizer, [PROMPTS[1]], config)[0].text
    # Random weights sample stray byte tokens (truly invalid UTF-8 -> U+FFFD), but no chunk but the last
    # may end in U+FFFD: an incomplete character is always held back.
    assert all(chunk and not chunk.endswith("\ufffd") for chunk in chunks[:-1])


def test_prompt_too_long_for_context(tokenizer) -> None:
    small = make_model(tokenizer.vocab_size, max_positions=32)
    ids = [0] + [50] * 25
    too_long = r"prompt 0 has 26 tokens.*context of 32.*at most 24 tokens or ask for at most 6 new tokens$"
    with pytest.raises(FidelError, match=too_long):
        generate(small, tokenizer, [ids], GenerationConfig(max_new_tokens=8))
    with pytest.raises(
        FidelError, match=r"max_new_tokens 40 .*context of 32 .*; ask for at most 6 new tokens$"
    ):
        generate(small, tokenizer, [ids], GenerationConfig(max_new_tokens=40))  # no negative prompt length
    assert len(generate(small, tokenizer, [ids], GenerationConfig(max_new_tokens=6))[0].token_ids) <= 6


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", float("nan"), "temperature"),
        ("temperature", -0.1, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("stop_strings", ("",), "stop strings"),
        ("seed", 1.5, "seed"),
        ("seed", 2**64, r"seed must be in \[-9223372036854775808, 18446744073709551615\]"),
        ("seed", -(2**63) - 1, "seed must be in"),
        ("temperature", "0.7", "temperature must be a number"),  # were TypeErrors from math.isfinite
        ("top_p", None, "top_p must be a number"),
        ("stop_strings", 5, "stop_strings must be a string or a list"),
        ("stop_token_ids", ["a"], "stop_token_ids must be token ids"),  # was a ValueError
        ("stop_token_ids", [2.7], "stop_token_ids must be token ids"),  # was truncated to id 2
    ],
)
def test_bad_config_is_a_clear_error(field: str, value: object, message: str) -> None:
    with pytest.raises(FidelError, match=message):
        GenerationConfig(**{field: value})


def test_one_stop_string_or_id_is_one_stop(model, tokenizer) -> None:
    """A plain string is one stop string, not one per character (as in HF and vLLM); an id is one id."""
    config = GenerationConfig(stop_strings="\n\n", stop_token_ids=7)
    assert (config.stop_strings, config.stop_token_ids) == (("\n\n",), (7,))
    free = generate(model, tokenizer, [PROMPTS[1]], GenerationConfig(max_new_tokens=40, temperature=0))[0]
    pair = free.text[5:7]  # split into characters, either one would have stopped it, by itself
    config = GenerationConfig(max_new_tokens=40, temperature=0, stop_strings=pair)
    stopped = generate(model, tokenizer, [PROMPTS[1]], config)[0]
    assert stopped.stop == pair and stopped.text == free.text[: free.text.index(pair)]


def test_bad_prompts_are_clear_errors(model, tokenizer) -> None:
    with pytest.raises(FidelError, match="non-empty list"):
        generate(model, tokenizer, "ሰላም")
    with pytest.raises(FidelError, match="prompt 1 is empty"):
        generate(model, tokenizer, [[0, 5], []])
    with pytest.raises(FidelError, match="outside the vocabulary"):
        generate(model, tokenizer, [[0, 10_000]])


def test_seeds_torch_accepts_for_every_row(model, tokenizer) -> None:
    """Row i samples with seed + i: the largest seed works alone, and two rows refuse it up front."""
    top = GenerationConfig(max_new_tokens=2, seed=2**64 - 1)
    (alone,) = generate(model, tokenizer, [PROMPTS[0]], top)
    assert len(alone.token_ids) >= 1
    with pytest.raises(FidelError, match=r"seed must be in \[.*, 18446744073709551614\] with 2 rows"):
        generate(model, tokenizer, PROMPTS[:2], top)
    lowest = GenerationConfig(max_new_tokens=2, seed=-(2**63))
    assert len(generate(model, tokenizer, PROMPTS[:2], lowest)) == 2


def test_tiny_positive_temperature_is_greedy(model, tokenizer) -> None:
    """A temperature that would overflow the scaled logits (1e-72) decodes greedily instead of failing."""
    greedy = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0.0))
    tiny = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=1e-72, seed=3))
    assert [r.token_ids for r in tiny] == [r.token_ids for r in greedy]


def test_sampling_draws_follow_the_softmax() -> None:
    """The inverse-CDF draw is the categorical distribution: frequencies over 40,000 draws match the
    softmax within 4 standard errors, and filtered (-inf) tokens never come up."""
    from fidellm.generate.sampling import choose_tokens

    logits = torch.tensor([[2.0, 0.5, float("-inf"), 1.0, -1.0, 0.0]])
    probs = torch.softmax(logits, dim=-1)[0]
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    draws = torch.cat([choose_tokens(logits, seen, [generator], 1.0) for _ in range(40_000)])
    counts = torch.bincount(draws, minlength=logits.shape[1]).double() / len(draws)
    error = (probs.double() * (1 - probs.double()) / len(draws)).sqrt()
    assert counts[2] == 0
    assert ((counts - probs.double()).abs() <= 4 * error + 1e-12).all(), (counts, probs)
