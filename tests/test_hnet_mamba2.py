"""Mamba-2 in plain PyTorch: the chunked SSD scan against the sequential recurrence, the step path."""

from __future__ import annotations

import pytest
import torch

from fidellm.models.hnet.mamba2 import Mamba2, ssd_scan


def naive_scan(x, a, b, c, state):
    """h_t = exp(a_t)·h_{t-1} + x_t ⊗ b_t, y_t = h_t · c_t, one position at a time."""
    outputs = []
    for t in range(x.shape[1]):
        state = state * a[:, t].exp()[..., None, None] + x[:, t, :, :, None] * b[:, t, :, None]
        outputs.append((state * c[:, t, :, None]).sum(-1))
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize(("length", "chunk_size"), [(37, 8), (16, 16), (5, 64), (1, 4), (100, 4), (64, 4)])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("groups", [6, 2, 1])
def test_chunked_scan_equals_sequential_recurrence(
    length: int, chunk_size: int, with_initial_state: bool, groups: int
) -> None:
    torch.manual_seed(0)
    batch, heads, dim, state_dim = 2, 6, 4, 5
    x = torch.randn(batch, length, heads, dim)
    a = -torch.rand(batch, length, heads) * 2
    b, c = torch.randn(batch, length, groups, state_dim), torch.randn(batch, length, groups, state_dim)
    initial = torch.randn(batch, heads, dim, state_dim) if with_initial_state else None
    y, final = ssd_scan(x, a, b, c, chunk_size, initial)
    per_head = heads // groups  # each group's B and C serve that many consecutive heads
    expected_y, expected_final = naive_scan(
        x,
        a,
        b.repeat_interleave(per_head, dim=2),
        c.repeat_interleave(per_head, dim=2),
        torch.zeros(batch, heads, dim, state_dim) if initial is None else initial,
    )
    torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, expected_final, atol=1e-5, rtol=1e-5)


def small_mamba(chunk_size: int = 8, ngroups: int = 1) -> Mamba2:
    torch.manual_seed(0)
    return Mamba2(32, d_state=16, d_conv=4, expand=2, headdim=8, ngroups=ngroups, chunk_size=chunk_size)


def test_parameter_names_and_shapes_follow_the_reference() -> None:
    shapes = {name: tuple(p.shape) for name, p in Mamba2(1024, chunk_size=64).named_parameters()}
    assert shapes == {
        "in_proj.weight": (4384, 1024),
        "conv1d.weight": (2304, 1, 4),
        "conv1d.bias": (2304,),
        "dt_bias": (32,),
        "A_log": (32,),
        "D": (32,),
        "norm.weight": (2048,),
        "out_proj.weight": (1024, 2048),
    }


@pytest.mark.parametrize("ngroups", [1, 2])
def test_recurrent_steps_equal_the_chunked_forward(ngroups: int) -> None:
    mixer = small_mamba(ngroups=ngroups)
    u = torch.randn(2, 21, 32)
    with torch.no_grad():
        full = mixer(u)
        cache = mixer.new_cache(2, u.device, u.dtype)
        steps = torch.cat([mixer.step(u[:, t : t + 1], cache) for t in range(u.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_prefill_then_steps_equal_the_full_forward() -> None:
    mixer = small_mamba()
    u = torch.randn(2, 30, 32)
    with torch.no_grad():
        full = mixer(u)
        cache = mixer.new_cache(2, u.device, u.dtype)
        prefix = mixer(u[:, :13], cache)
        rest = torch.cat([mixer.step(u[:, t : t + 1], cache) for t in range(13, 30)], dim=1)
    torch.testing.assert_close(torch.cat((prefix, rest), dim=1), full, atol=1e-5, rtol=1e-5)


def test_scan_chunk_length_does_not_change_the_output() -> None:
    u = torch.randn(1, 40, 32)
    with torch.no_grad():
        outputs = [small_mamba(chunk_size)(u) for chunk_size in (4, 16, 64)]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=1e-5, rtol=1e-5)


def test_mixer_is_causal() -> None:
    mixer = small_mamba()
    u = torch.randn(1, 24, 32)
    changed = u.clone()
    changed[:, 10:] = torch.randn(1, 14, 32)
    with torch.no_grad():
        before, after = mixer(u), mixer(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10])
    assert not torch.allclose(after[:, 10:], before[:, 10:])
