"""The Transformer pieces shared by every model: RMSNorm, RoPE, grouped-query attention, SwiGLU, the block.

Module and parameter names follow Hugging Face Llama (`self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, ...) so a stack of `TransformerBlock`s has HF's state-dict keys without renaming.
RoPE uses HF's "rotate_half" layout (the two halves of each head are the real and imaginary parts), so
Q/K weights load into `transformers.LlamaForCausalLM` unpermuted. The numerics mirror HF's (RMSNorm in
fp32, cos/sin in fp32) so fp32 logits agree to ~1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain; computed in fp32 and cast back, as HF does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for given positions (HF "default" rope type)."""

    inv_freq: Tensor

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        # Not persistent: derived from the config, and HF's checkpoints do not hold it either.
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (*positions.shape, head_dim), computed in fp32, returned in `dtype`.

        `positions` is (seq,) for one shared position range or (batch, seq) for per-row positions
        (left-padded batches in generation).
        """
        freqs = positions.float()[..., None] * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x of shape (batch, heads, seq, head_dim) by the angles of its positions."""
    return x * cos + rotate_half(x) * sin


@dataclass
class KVCache:
    """One layer's keys and values seen so far, each (batch, kv_heads, length, head_dim), or None.

    Deliberately simple (concatenation per step); the generation engine may replace it with
    preallocated buffers behind the same `length` / `append` interface.
    """

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of positions already cached: the position offset of the next tokens."""
        return 0 if self.k is None else self.k.shape[2]

    def select(self, rows: Tensor, first: int = 0) -> KVCache:
        """A cache of the batch rows at `rows` (repeats allowed), from position `first` on."""
        assert self.k is not None and self.v is not None, "an empty cache has no rows"
        return KVCache(self.k[rows, :, first:], self.v[rows, :, first:])

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' keys and values; return all keys and values so far."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v


def is_kv_cache(cache: object) -> bool:
    """Whether `cache` is a per-layer list of KVCache (the Llama's, whose rows can be copied and dropped)."""
    return isinstance(cache, list) and all(isinstance(layer, KVCache) for layer in cache)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE on `scaled_dot_product_attention`, no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"{n_heads} attention heads are not a multiple of {n_kv_heads} KV heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (batch, seq, dim); cos/sin: (seq, head_dim) or (batch, 1, seq, head_dim) for x's positions;
        cache is updated in place. `attn_mask` (batch, 1, seq, past + seq), True = may attend, replaces
        the built-in causal mask (padded batches); without it attention is plainly causal."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # repeat_interleave over heads; SDPA's enable_gqa needs torch >= 2.5
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        mask = attn_mask
        if mask is None and past and seq > 1:
            # SDPA's is_causal aligns the mask top-left; with a cache query i sees keys 0..past+i.
            keys = torch.arange(past + seq, device=x.device)
            mask = keys[None, :] <= (keys[past:, None])
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and past == 0 and seq > 1,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); dropout on both residual branches."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        ffn_dim: int,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim, dropout)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, ffn_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
