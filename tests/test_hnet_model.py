"""The recursive H-Net LM: layout parsing, config, reference names and sizes, causality, padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fidellm.errors import FidelError
from fidellm.models.hnet import HNetConfig, HNetForCausalLM, parse_layout, preset
from fidellm.models.hnet.layers import CausalAttention
from fidellm.models.hnet.presets import NOMINAL_PARAMS, PRESETS, count_parameters, format_preset_table
from fidellm.models.llama import NAME_TOLERANCE
from fidellm.models.loss import IGNORE_INDEX

TINY = ("hnet-tiny", "hnet-2s-tiny")


def tiny_model(name: str, seed: int = 0) -> HNetForCausalLM:
    torch.manual_seed(seed)
    return HNetForCausalLM(preset(name, max_position_embeddings=256)).eval()


def random_bytes(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 254, (batch, length), generator=generator)
    ids[:, 0] = 254
    return ids


def reference_config(layout: str, d_model: list[int], d_intermediate: list[int]) -> HNetConfig:
    """A released-checkpoint shape: 16 heads, rotary on half of each head, window 1023 outside."""
    levels = len(d_model)
    return HNetConfig(
        layout,
        d_model,
        d_intermediate,
        num_heads=[16] * levels,
        rotary_emb_dim=[d // 32 for d in d_model],
        window_size=[1023] * (levels - 1) + [-1],
    )


def test_parse_layout() -> None:
    assert parse_layout("m4,[T22],m4") == ["m4", ["T22"], "m4"]
    assert parse_layout("m4,[T1m4,[T26],m4T1],m4") == ["m4", ["T1m4", ["T26"], "m4T1"], "m4"]
    assert parse_layout("T8") == ["T8"]
    assert parse_layout(" m2, [M1t1], m2 ") == ["m2", ["M1t1"], "m2"]


@pytest.mark.parametrize(
    "layout", ["m4,[T22]", "m4,[T22],m4]", "m4,T22,m4", "x4,[T2],m4", "", "m4,[T2],[m4]"]
)
def test_parse_layout_rejects_malformed_strings(layout: str) -> None:
    with pytest.raises(FidelError, match="arch_layout"):
        parse_layout(layout)


def test_config_round_trips_and_validates() -> None:
    config = preset("hnet-2s-tiny")
    assert HNetConfig.from_dict(config.to_dict()) == config
    assert config.target_ratio == [3, 3] and preset("hnet-tiny").target_ratio == [6]
    assert config.num_stages == 2
    bad = {**config.to_dict(), "d_model": [64, 96]}
    with pytest.raises(FidelError, match="d_model has 2 entries"):
        HNetConfig.from_dict(bad)
    with pytest.raises(FidelError, match="d_intermediate 0"):
        HNetConfig.from_dict({**config.to_dict(), "d_intermediate": [0, 0, 384]})
    with pytest.raises(FidelError, match="missing field"):
        HNetConfig.from_dict({"arch_layout": "T2"})
    with pytest.raises(FidelError, match="unknown H-Net preset"):
        preset("hnet-huge")


def test_state_dict_keys_follow_the_reference() -> None:
    one = HNetForCausalLM(reference_config("m1,[T1],m1", [64, 128], [0, 256])).state_dict()
    assert {"embeddings.weight", "lm_head.weight", "backbone.residual_proj.bias"} <= set(one)
    assert one["backbone.main_network.pad_dimension"].shape == (64,)
    for key in (
        "backbone.encoder.layers.0.mixer.A_log",
        "backbone.decoder.layers.0.mixer.conv1d.weight",
        "backbone.encoder.rmsnorm.weight",
        "backbone.routing_module.q_proj_layer.weight",
        "backbone.routing_module.k_proj_layer.weight",
        "backbone.main_network.main_network.layers.0.mixer.Wqkv.weight",
        "backbone.main_network.main_network.layers.0.mlp.fc1.weight",
        "backbone.main_network.main_network.layers.0.norm2.weight",
        "backbone.main_network.main_network.rmsnorm.weight",
    ):
        assert key in one, key
    two = HNetForCausalLM(
        reference_config("m1,[T1m1,[T1],m1T1],m1", [64, 64, 128], [0, 128, 256])
    ).state_dict()
    assert "backbone.main_network.routing_module.q_proj_layer.weight" in two
    assert "backbone.main_network.main_network.main_network.layers.0.mixer.out_proj.weight" in two
    assert "backbone.main_network.pad_dimension" not in two


@pytest.mark.parametrize(
    ("layout", "d_model", "d_intermediate", "params"),
    [
        ("m4,[T22],m4", [1024, 1536], [0, 4096], 679),  # hnet_1stage_L
        ("m4,[T1m4,[T26],m4T1],m4", [1024, 1024, 1536], [0, 2816, 4096], 874),  # hnet_2stage_L
    ],
)
def test_released_shapes_have_the_released_parameter_counts(
    layout: str, d_model: list[int], d_intermediate: list[int], params: int
) -> None:
    total, _ = count_parameters(reference_config(layout, d_model, d_intermediate))
    assert round(total / 1e6) == params


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sizes_match_their_names(name: str) -> None:
    total, non_embedding = count_parameters(preset(name))
    assert abs(total - NOMINAL_PARAMS[name]) <= NAME_TOLERANCE * NOMINAL_PARAMS[name]
    assert total - non_embedding == 2 * 256 * preset(name).d_model[0]


def test_preset_table_lists_every_preset() -> None:
    table = format_preset_table()
    assert all(f"| {name} |" in table for name in PRESETS)


@pytest.mark.parametrize("name", TINY)
def test_future_bytes_do_not_change_past_logits(name: str) -> None:
    model = tiny_model(name)
    ids = random_bytes(2, 96)
    ids[1, 40] = 254  # a packed document start
    changed = ids.clone()
    changed[:, 50:] = random_bytes(2, 46, seed=2)
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after.logits[:, :50], before.logits[:, :50], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after.logits[:, 50:], before.logits[:, 50:])


def test_every_layer_letter_builds_and_stays_causal() -> None:
    torch.manual_seed(0)
    config = HNetConfig(
        "M1t1,[m1T1],t1M1",
        [64, 96],
        [128, 256],
        num_heads=[2, 3],
        rotary_emb_dim=[16, 0],
        window_size=[5, -1],
        d_state=16,
        headdim=32,
        chunk_size=8,
    )
    model = HNetForCausalLM(config).eval()
    encoder = model.backbone.encoder.layers
    assert encoder[0].mlp is not None and encoder[1].mlp is None  # M has an MLP, t has none
    ids = random_bytes(1, 40)
    changed = ids.clone()
    changed[:, 25:] = random_bytes(1, 15, seed=3)
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :25], before[:, :25], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_a_row_alone_equals_the_same_row_in_a_padded_batch(name: str) -> None:
    model = tiny_model(name)
    lengths = [70, 33, 51]
    rows = [random_bytes(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    rows[0][45] = 254
    ids = torch.full((3, max(lengths)), 255)
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])
            torch.testing.assert_close(batch.logits[i, : len(row)], alone.logits[0], atol=1e-5, rtol=1e-5)
        # Padding is excluded from the chunking statistics: a padded single row reports as it does alone.
        padded = model(ids[1:2], attention_mask=mask[1:2])
        alone = model(rows[1][None])
    for got, want in zip(
        padded.ratio_losses + padded.bytes_per_chunk, alone.ratio_losses + alone.bytes_per_chunk, strict=True
    ):
        torch.testing.assert_close(got, want)


def test_left_padding_and_overlong_input_are_rejected() -> None:
    model = tiny_model("hnet-tiny")
    ids = random_bytes(1, 8)
    with pytest.raises(FidelError, match="right-padded"):
        model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(FidelError, match="max_position_embeddings"):
        model(random_bytes(1, 257))


@pytest.mark.parametrize("name", TINY)
def test_outputs_losses_and_gradients(name: str) -> None:
    model = tiny_model(name).train()
    ids = random_bytes(2, 64)
    targets = ids.roll(-1, dims=1)
    targets[:, -5:] = IGNORE_INDEX
    out = model(ids, targets)
    assert out.logits.shape == (2, 64, 256) and out.loss is not None and out.aux_loss is not None
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    assert len(out.ratio_losses) == len(out.bytes_per_chunk) == model.config.num_stages
    torch.testing.assert_close(out.aux_loss, 0.03 * sum(out.ratio_losses))
    assert all(1.0 <= float(b) <= 64.0 for b in out.bytes_per_chunk)
    assert float(out.bytes_per_chunk[-1]) >= float(out.bytes_per_chunk[0])
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_construction_and_forward_are_deterministic() -> None:
    first, second = tiny_model("hnet-2s-tiny", seed=3), tiny_model("hnet-2s-tiny", seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = random_bytes(2, 48)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, first(ids).logits)
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_sliding_window_partial_rotary_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attention = CausalAttention(dim=16, num_heads=2, rotary_dim=4, window=3)
    x = torch.randn(1, 10, 16)
    q, k, v = attention.Wqkv(x).view(1, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    positions = torch.arange(10).float()
    angles = positions[:, None] * attention.rotary.inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def rotate(t: torch.Tensor) -> torch.Tensor:
        rot = t[..., :4]
        rotated = rot * cos + torch.cat((-rot[..., 2:], rot[..., :2]), -1) * sin
        return torch.cat((rotated, t[..., 4:]), -1)

    scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(8)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    scores = scores.masked_fill(~((j <= i) & (j >= i - 3)), float("-inf"))
    expected = attention.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 10, 16))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_training_and_bf16_weights() -> None:
    model = tiny_model("hnet-2s-tiny").train()
    ids = random_bytes(2, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, ids)
    assert out.loss is not None and out.aux_loss is not None and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    half = tiny_model("hnet-tiny").to(torch.bfloat16)
    with torch.no_grad():
        logits = half(ids).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits.float()).all())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_model", 128, "d_model must be a list of integers"),  # was a TypeError traceback
        ("d_model", "128", "d_model must be a list of integers"),  # was read digit by digit
        ("d_model", [128.5, 192], "d_model must be a list of integers"),  # was cut to 128
        ("window_size", [True, -1], "window_size must be a list of integers"),
        ("target_ratio", 6, "target_ratio must be a list of integers"),
        ("vocab_size", "256", "vocab_size must be an integer"),  # was a TypeError traceback
        ("d_state", 31.5, "d_state must be an integer"),
        ("arch_layout", ["m2", ["T2"], "m2"], "arch_layout must be a string"),
        ("ratio_loss_weight", -0.03, "ratio_loss_weight must be a number >= 0"),  # trained away from N
        ("ratio_loss_weight", float("nan"), "ratio_loss_weight must be a number >= 0"),
    ],
)
def test_config_fields_of_the_wrong_kind_are_named(field: str, value: object, message: str) -> None:
    data = {**preset("hnet-tiny").to_dict(), field: value}
    with pytest.raises(FidelError, match=message):
        HNetConfig.from_dict(data)
    whole = HNetConfig.from_dict({**preset("hnet-tiny").to_dict(), "d_model": [128.0, 192], "d_state": 32.0})
    assert whole.d_model == [128, 192] and whole.d_state == 32 and isinstance(whole.d_state, int)
