"""Mamba-2 in plain PyTorch: the chunked SSD scan (einsum form) and a one-token recurrent step.

Parameter names follow the reference (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`,
`out_proj`) so released H-Net state dicts load unchanged. The scan runs in fp32. It materialises
(batch, heads, chunks, L, L) tensors, so `chunk_size` L trades memory against the number of
sequential inter-chunk steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = x[..., j+1] + ... + x[..., i] for j ≤ i, -inf above the diagonal (stable form)."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)  # [..., i, j] = x_i
    strict = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    sums = x.masked_fill(~strict, 0.0).cumsum(dim=-2)
    return sums.masked_fill(~torch.ones_like(strict).tril(), -math.inf)


def ssd_scan(
    x: Tensor, a: Tensor, b: Tensor, c: Tensor, chunk_size: int, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Chunked scan of h_t = exp(a_t)·h_{t-1} + x_t ⊗ b_t, y_t = h_t · c_t (inputs already discretised).

    x (batch, len, heads, p), a (batch, len, heads), b and c (batch, len, groups, n), each group shared
    by heads // groups consecutive heads, initial_state (batch, heads, p, n) or None (zeros). Returns
    y (batch, len, heads, p) and the final state.

    Internally every tensor is (batch, groups, heads per group, chunks, L, ·), so each product is one
    batched matmul over contiguous batch dimensions, and C·Bᵀ is computed once per group, not per head.
    """
    batch, length, heads, dim = x.shape
    groups, state_dim = b.shape[2], b.shape[3]
    pad = (-length) % chunk_size
    if pad:  # trailing zeros: a = 0 and x = 0 leave the state, and so every earlier output, unchanged
        x, b, c = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, b, c))
        a = F.pad(a, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    def by_chunk(t: Tensor) -> Tensor:  # (batch, len, k, d) -> (batch, groups, k // groups, chunks, L, d)
        t = t.reshape(batch, chunks, chunk_size, t.shape[2], t.shape[3]).permute(0, 3, 1, 2, 4)
        return t.unflatten(1, (groups, t.shape[1] // groups))

    x, b, c = by_chunk(x), by_chunk(b), by_chunk(c)  # b, c: (batch, groups, 1, chunks, L, n)
    a = a.reshape(batch, chunks, chunk_size, groups, heads // groups).permute(0, 3, 4, 1, 2)
    a_cum = a.cumsum(dim=-1)  # (batch, groups, heads per group, chunks, L)

    # Within each chunk: a masked, decayed attention-like product.
    y = ((c @ b.transpose(-1, -2)) * torch.exp(segsum(a))) @ x

    # Each chunk's own contribution to the state at its end, stored (n, p).
    states = b.transpose(-1, -2) @ (x * torch.exp(a_cum[..., -1:] - a_cum)[..., None])

    # Carry states across chunks: the state entering each chunk.
    if initial_state is None:
        initial = states.new_zeros(*states.shape[:3], state_dim * dim)
    else:
        initial = initial_state.transpose(-1, -2).reshape(batch, groups, -1, state_dim * dim)
    entering, final_state = _carry(states.flatten(-2), a_cum[..., -1], initial.to(states.dtype), chunk_size)
    states = entering.unflatten(-1, (state_dim, dim))
    final_state = final_state.unflatten(-1, (state_dim, dim)).flatten(1, 2).transpose(-1, -2)

    # What the carried-in state adds to every position of the chunk.
    y = y + (c @ states) * torch.exp(a_cum)[..., None]
    y = y.flatten(1, 2).permute(0, 2, 3, 1, 4).reshape(batch, chunks * chunk_size, heads, dim)
    return y[:, :length], final_state


def _carry(states: Tensor, log_decay: Tensor, initial: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """The state entering each chunk, and the final state, of the chunk-level recurrence
    s'_k = exp(log_decay_k)·s'_{k-1} + states_k from s'_{-1} = initial: states (…, chunks, d), log_decay
    (…, chunks), initial (…, d).

    Chunks are grouped in blocks of `block`: a decayed product inside each block, then one across the
    blocks, so the work grows with chunks × block rather than chunks² (128 chunks: 8x less).
    """
    chunks = states.shape[-2]
    pad = (-chunks) % block
    if pad:  # decay 0 and no input: the padded chunks leave the state unchanged
        states, log_decay = F.pad(states, (0, 0, 0, pad)), F.pad(log_decay, (0, pad))
    blocked = states.unflatten(-2, (-1, block))  # (…, blocks, block, d)
    decay = log_decay.unflatten(-1, (-1, block))
    decay_cum = decay.cumsum(dim=-1)
    within = torch.exp(segsum(decay))  # within[i, j]: from the end of chunk j to the end of chunk i
    totals = torch.cat((initial[..., None, :], (within[..., -1:, :] @ blocked)[..., 0, :]), dim=-2)
    across = torch.exp(segsum(F.pad(decay_cum[..., -1], (1, 0)))) @ totals  # entering each block; final
    # entering chunk i of a block: the block's chunks before i, plus the state entering the block
    before = F.pad(within[..., :-1, :], (0, 0, 1, 0))
    entering = (before @ blocked).addcmul_(torch.exp(decay_cum - decay)[..., None], across[..., :-1, None, :])
    entering = entering.flatten(-3, -2)[..., :chunks, :]
    return entering, across[..., -1, :]


@dataclass
class MambaCache:
    """One Mamba-2 layer's recurrent state: the last d_conv-1 conv inputs and the SSM state."""

    conv: Tensor  # (batch, d_conv - 1, conv_dim)
    ssm: Tensor  # (batch, heads, headdim, d_state), fp32


class GatedRMSNorm(nn.Module):
    """rmsnorm(y · silu(z)) · weight per group of channels (the reference's norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        grouped = y.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight.float()).to(dtype)


class Mamba2(nn.Module):
    """The Mamba-2 mixer: in_proj -> causal conv + SiLU -> SSD -> + D·x -> gated norm -> out_proj."""

    A_log: Tensor
    D: Tensor
    dt_bias: Tensor

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        self.nheads, self.headdim = self.d_inner // headdim, headdim
        self.d_state, self.ngroups, self.d_conv, self.chunk_size = d_state, ngroups, d_conv, chunk_size
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Reference init: dt log-uniform in [dt_min, dt_max] (stored as softplus⁻¹), A ~ U[1, 16], D = 1."""
        with torch.no_grad():
            u = torch.rand(self.nheads, device=self.dt_bias.device)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.empty_like(dt).uniform_(1, 16)))
            self.D.fill_(1.0)

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> MambaCache:
        """A zero state: the same as starting the sequence here."""
        conv = torch.zeros(batch, self.d_conv - 1, self.conv_dim, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return MambaCache(conv, ssm)

    def _split(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        return z, xbc, dt

    def _ssm_inputs(self, xbc: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (…, heads, p), dt (…, heads), B and C per group (…, groups, n), all fp32."""
        x, b, c = (
            F.silu(xbc)
            .float()
            .split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], -1)
        )
        x = x.unflatten(-1, (self.nheads, self.headdim))
        b = b.unflatten(-1, (self.ngroups, self.d_state))
        c = c.unflatten(-1, (self.ngroups, self.d_state))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return x, b, c, dt, -torch.exp(self.A_log.float())

    def _output(self, y: Tensor, x: Tensor, z: Tensor) -> Tensor:
        y = (y + x * self.D.float()[:, None]).flatten(-2)
        return self.out_proj(self.norm(y.to(z.dtype), z))

    def forward(self, u: Tensor, cache: MambaCache | None = None, valid: Tensor | None = None) -> Tensor:
        """u (batch, seq, d_model) -> same shape; continues from and updates `cache` when given.

        `valid` (batch, seq) marks real positions, trailing padding after them: padding leaves the
        cached state untouched (dt = 0), so each row's cache ends at its own last real position.
        """
        z, xbc, dt = self._split(u)
        past = None if cache is None else cache.conv.to(xbc.dtype)
        if past is None:
            past = xbc.new_zeros(u.shape[0], self.d_conv - 1, self.conv_dim)
        window = torch.cat((past, xbc), dim=1)
        conv = F.conv1d(window.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        x, b, c, dt, a = self._ssm_inputs(conv.transpose(1, 2), dt)
        if valid is not None:
            dt = dt * valid[..., None]
        y, state = ssd_scan(
            x * dt[..., None], a * dt, b, c, self.chunk_size, None if cache is None else cache.ssm
        )
        if cache is not None:
            ends = u.new_full((u.shape[0],), u.shape[1], dtype=torch.long) if valid is None else valid.sum(1)
            index = ends[:, None] + torch.arange(self.d_conv - 1, device=u.device)  # window is shifted by k-1
            cache.conv = window.gather(1, index[..., None].expand(-1, -1, self.conv_dim))
            cache.ssm = state
        return self._output(y, x, z)

    def step(self, u: Tensor, cache: MambaCache, active: Tensor | None = None) -> Tensor:
        """One position per row, by the plain recurrence: u (batch, 1, d_model). Updates `cache` for the
        rows where `active` (batch,) is True (all rows without it)."""
        z, xbc, dt = self._split(u[:, 0])
        window = torch.cat((cache.conv.to(xbc.dtype), xbc[:, None]), dim=1)  # (batch, d_conv, conv_dim)
        conv = (window * self.conv1d.weight[:, 0].t()).sum(dim=1) + self.conv1d.bias
        x, b, c, dt, a = self._ssm_inputs(conv, dt)
        repeat = self.nheads // self.ngroups
        b, c = b.repeat_interleave(repeat, dim=-2), c.repeat_interleave(repeat, dim=-2)
        state = (
            cache.ssm * torch.exp(a * dt)[..., None, None] + (x * dt[..., None])[..., None] * b[:, :, None]
        )
        y = (state * c[:, :, None]).sum(-1)
        if active is None:
            cache.conv, cache.ssm = window[:, 1:], state
        else:
            cache.conv = torch.where(active[:, None, None], window[:, 1:], cache.conv)
            cache.ssm = torch.where(active[:, None, None, None], state, cache.ssm)
        return self._output(y, x, z)[:, None]
