"""The Llama-style decoder: causality, KV-cache equivalence, loss, parameter counts, presets, and the
checks of saved model configs (both architectures)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fidellm.errors import FidelError
from fidellm.models.blocks import KVCache
from fidellm.models.factory import config_from_dict, config_to_dict, preset_config
from fidellm.models.hnet import preset as hnet_preset
from fidellm.models.llama import (
    NAME_TOLERANCE,
    NOMINAL_PARAMS,
    PRESET_DEPTHS,
    LlamaForCausalLM,
    count_parameters,
    format_preset_table,
    pad_vocab,
    preset,
    preset_table,
)
from fidellm.models.loss import IGNORE_INDEX
from fixtures.models import gqa_config, random_llama


def test_state_dict_has_hf_llama_names() -> None:
    config = gqa_config(num_hidden_layers=2)
    keys = set(LlamaForCausalLM(config).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    assert keys == expected


def test_future_tokens_do_not_change_past_logits() -> None:
    model = random_llama(gqa_config())
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (2, 48))
    t = 20
    changed = ids.clone()
    changed[:, t + 1 :] = torch.randint(0, 320, (2, 48 - t - 1))
    assert not torch.equal(ids[:, t + 1 :], changed[:, t + 1 :])
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_document_masking_gives_each_packed_document_its_logits_alone() -> None:
    model = random_llama(gqa_config())
    bos = model.config.bos_token_id
    torch.manual_seed(5)
    tail, *documents = (torch.randint(1, 320, (n,)) for n in (3, 7, 9, 5))
    documents = [torch.cat([torch.tensor([bos]), d]) for d in documents]  # each starts with BOS
    window = torch.cat([tail, *documents]).unsqueeze(0)
    with torch.no_grad():
        plain = model(window).logits[0]
        model.document_masking = True
        masked = model(window).logits[0]
        start = 0
        for piece in (tail, *documents):
            alone = model(piece.unsqueeze(0)).logits[0]
            assert (masked[start : start + len(piece)] - alone).abs().max() < 1e-5
            if start:  # without the mask, a later document sees the earlier ones
                assert (plain[start : start + len(piece)] - alone).abs().max() > 1e-3
            start += len(piece)
        changed = window.clone()
        changed[0, -4:] = 7  # and it stays causal
        assert torch.equal(model(changed).logits[0, :-4], masked[:-4])


def test_cached_decoding_matches_full_forward() -> None:
    model = random_llama(gqa_config())
    torch.manual_seed(2)
    ids = torch.randint(0, 320, (3, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :16], cache=cache).logits]  # prompt
        steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(16, 30)]  # one at a time
        steps.append(model(ids[:, 30:], cache=cache).logits)  # a chunk after a filled cache
    cached = torch.cat(steps, dim=1)
    assert all(layer.length == 40 for layer in cache)
    assert (cached - full).abs().max().item() <= 1e-5


def test_kv_cache_appends_along_positions() -> None:
    cache = KVCache()
    assert cache.length == 0
    k, v = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4)
    cache.append(k, v)
    all_k, all_v = cache.append(k[:, :, :1], v[:, :, :1])
    assert cache.length == 4 and all_k.shape == (1, 2, 4, 4) and torch.equal(all_v, torch.ones(1, 2, 4, 4))


def test_context_overflow_is_a_clear_error() -> None:
    model = random_llama(gqa_config(max_position_embeddings=16))
    cache = model.new_cache()
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(FidelError, match="exceed the model's context of 16"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


def test_loss_is_cross_entropy_on_shifted_targets_ignoring_minus_100() -> None:
    model = random_llama(gqa_config())
    torch.manual_seed(3)
    ids = torch.randint(0, 320, (2, 25))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :5] = IGNORE_INDEX
    out = model(inputs, targets=targets)
    keep = targets != IGNORE_INDEX
    manual = F.cross_entropy(model(inputs).logits[keep], targets[keep])
    assert out.logits is None  # the chunked loss never holds all logits
    assert out.loss is not None and torch.allclose(out.loss, manual, atol=1e-6)
    model.loss_chunk_tokens = 0
    materialized = model(inputs, targets=targets)
    assert materialized.logits is not None and torch.allclose(materialized.loss, manual, atol=1e-6)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model(inputs).loss is None


def test_num_parameters_counts_tied_embedding_once() -> None:
    config = gqa_config()
    tied = LlamaForCausalLM(config)
    h, f, v, layers = 64, 160, 320, 3
    per_layer = h * 4 * 16 * 2 + h * 2 * 16 * 2 + 3 * h * f + 2 * h
    assert tied.num_parameters(exclude_embeddings=True) == layers * per_layer + h
    assert tied.num_parameters() == layers * per_layer + h + v * h
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = LlamaForCausalLM(gqa_config(tie_word_embeddings=False))
    assert untied.num_parameters() == tied.num_parameters() + v * h
    assert untied.num_parameters(exclude_embeddings=True) == tied.num_parameters(exclude_embeddings=True)
    assert count_parameters(config) == (tied.num_parameters(), tied.num_parameters(exclude_embeddings=True))


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_preset_names_match_true_counts(name: str) -> None:
    nominal, exclude_embeddings = NOMINAL_PARAMS[name]
    total, non_embedding = count_parameters(preset(name, 32000))
    count = non_embedding if exclude_embeddings else total
    assert abs(count - nominal) <= NAME_TOLERANCE * nominal, (name, count)


def test_presets_serve_well() -> None:
    rows = preset_table(32000)
    assert [row["name"] for row in rows] == list(PRESET_DEPTHS)
    for name in PRESET_DEPTHS:
        config = preset(name, 31990)
        assert config.vocab_size == 32000 and config.vocab_size % 64 == 0
        assert config.head_dim in (64, 128)
        assert config.num_attention_heads * config.head_dim == config.hidden_size
    chat = preset("chat-512", 16000)
    assert (chat.hidden_size, chat.num_hidden_layers, chat.intermediate_size) == (512, 8, 1536)
    sizes = [row["params"] for row in rows]
    assert sizes == sorted(sizes)
    assert "| 25m | 6 | 384 |" in format_preset_table()


def test_tiny_preset_counts_are_true() -> None:
    model = LlamaForCausalLM(preset("tiny", 1000))
    assert model.config.vocab_size == pad_vocab(1000) == 1024
    assert count_parameters(model.config) == (
        sum(p.numel() for p in set(model.parameters())),
        sum(p.numel() for p in set(model.parameters())) - 1024 * 192,
    )


def test_bad_configs_are_refused() -> None:
    with pytest.raises(FidelError, match="not a multiple"):
        gqa_config(num_key_value_heads=3)
    with pytest.raises(FidelError, match="unknown model preset"):
        preset("huge", 32000)
    with pytest.raises(FidelError, match="outside the vocabulary"):
        gqa_config(vocab_size=1, pad_token_id=1)


@pytest.mark.parametrize(
    ("arch", "field", "value", "message"),
    [
        ("llama", "rope_theta", 0.0, "rope_theta must be a positive number"),  # was NaN rotary tables
        ("llama", "rope_theta", -5.0, "rope_theta must be a positive number"),
        ("llama", "rms_norm_eps", float("nan"), "rms_norm_eps must be a positive number"),
        ("llama", "dropout", None, "dropout None must be a number"),  # was a TypeError
        ("llama", "tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
        ("llama", "eos_token_id", ["x"], "eos_token_id must be token ids"),
        ("llama", "hidden_size", None, "hidden_size must be a positive integer"),
        ("llama", "hidden_size", "missing", "missing field.*hidden_size"),  # was a TypeError
        ("hnet", "rope_theta", 0, "rope_theta must be a positive number"),
        ("hnet", "d_model", ["a", 3], "hnet.*wrong type"),  # was a ValueError
        ("hnet", "vocab_size", "x", "hnet.*wrong type"),  # was a TypeError
        ("hnet", "arch_layout", 5, "hnet.*wrong type"),
    ],
)
def test_saved_configs_with_bad_fields_are_clear_errors(
    arch: str, field: str, value: object, message: str
) -> None:
    """A checkpoint's model_config (or an export's config.json) with a wrong field is a FidelError
    naming it, never a traceback or a model that silently computes NaN."""
    base = config_to_dict(gqa_config() if arch == "llama" else hnet_preset("hnet-2s-tiny"))
    data = {key: val for key, val in base.items() if key != field}
    if value != "missing":
        data[field] = value
    with pytest.raises(FidelError, match=message):
        config_from_dict(data)


def test_a_single_eos_id_is_accepted() -> None:
    assert config_from_dict({**config_to_dict(gqa_config()), "eos_token_id": 3}).eos_token_id == (3,)


def test_a_llama_on_the_byte_tokenizer_gets_the_byte_special_ids() -> None:
    """Byte shards start each document with 254: with BPE's ids (BOS 0, EOS 0 and 3) document masking
    split windows at NUL bytes instead, and generation stopped at NUL or ETX but ran past a BOS."""
    config = preset_config("llama", "tiny", 256, 64, {})
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (254, (254, 255), 255)
    model = LlamaForCausalLM(config).eval()
    model.document_masking = True
    ids = torch.tensor([[254, 65, 66, 0, 67, 254, 68, 69]])
    with torch.no_grad():
        alone = model(ids[:, 5:]).logits
        packed = model(ids).logits
    torch.testing.assert_close(packed[:, 5:], alone)
    bpe = preset_config("llama", "tiny", 512, 64, {})
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (0, (0, 3), 1)
