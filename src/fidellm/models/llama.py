"""The Llama-style decoder (RoPE, RMSNorm, SwiGLU, GQA, tied embeddings, no biases) and its presets.

State-dict keys are exactly Hugging Face Llama's (`model.embed_tokens.weight`,
`model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`), so export is a
rename-free copy (see `fidellm.export.hf`).

Presets come from one size knob, the depth d (nanochat's habit): hidden = 64·d, d heads of 64
(multi-head attention: KV heads = heads), SwiGLU width 3·hidden, so parameters grow as ~13·d·hidden²
plus the embedding. Names give the total parameter count at a 32,000-token vocabulary, the tied
embedding counted once (`tiny`, ~1.4M, is sized without embeddings: its embedding depends on the
small test tokenizers it runs with). `python -m fidellm.models.llama` prints the table.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from fidellm.errors import FidelError
from fidellm.models.blocks import KVCache, RMSNorm, RotaryEmbedding, TransformerBlock
from fidellm.models.loss import (
    DEFAULT_CHUNK_TOKENS,
    check_reduction,
    keep_last,
    linear_cross_entropy,
    logits_loss,
    token_cross_entropy,
)
from fidellm.tokenizer.special import BOS_ID, IM_END_ID, PAD_ID
from fidellm.values import is_integer, is_number

VOCAB_MULTIPLE = 64
INIT_STD = 0.02


SIZE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
)  # fmt: skip
"""LlamaConfig fields that must be positive integers."""


@dataclass
class LlamaConfig:
    """Shape and special ids of a LlamaForCausalLM; field names follow HF's LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int = BOS_ID
    eos_token_id: tuple[int, ...] = (BOS_ID, IM_END_ID)
    """Plain documents end at the next `<|bos|>`, chat turns at `<|im_end|>`."""
    pad_token_id: int = PAD_ID

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        self.eos_token_id = (eos,) if isinstance(eos, numbers.Integral) else tuple(eos)
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise FidelError(f"model config: {name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):  # theta <= 0 made NaN rotary tables, silently
            value = getattr(self, name)
            if not is_number(value) or not (math.isfinite(value) and value > 0):
                raise FidelError(f"model config: {name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise FidelError(
                f"model config: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}"
            )
        if not all(is_integer(i) for i in self.eos_token_id):
            raise FidelError(f"model config: eos_token_id must be token ids, got {eos!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FidelError(
                f"model config: num_attention_heads {self.num_attention_heads} is not a multiple of"
                f" num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise FidelError(f"model config: head_dim {self.head_dim} must be even (rotary embeddings)")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise FidelError(f"model config: dropout {self.dropout!r} must be a number in [0, 1)")
        for name in ("bos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise FidelError(f"model config: {name} {getattr(self, name)} is outside the vocabulary")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Build from a dict with (a superset of) this class's field names; a missing one is named."""
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        if missing := [name for name in required if name not in data]:
            raise FidelError(f"model config: missing field(s) {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in names})


def pad_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round the vocabulary up to a multiple of 64 (embedding padding for GPU kernels and vLLM)."""
    return math.ceil(vocab_size / multiple) * multiple


@dataclass
class LMOutput:
    """Logits (batch, seq, vocab) and, when targets were given, the cross-entropy in fp32: the mean, or
    per token with reduction "none". `logits` is None when the loss came from the chunked path, which
    never holds them all.
    """

    logits: Tensor | None
    loss: Tensor | None = None


class LlamaModel(nn.Module):
    """Embedding, the block stack and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TransformerBlock(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                config.intermediate_size,
                config.rms_norm_eps,
                config.dropout,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.max_positions = config.max_position_embeddings
        self.bos_token_id = config.bos_token_id

    def forward(
        self,
        input_ids: Tensor,
        cache: list[KVCache] | None = None,
        attention_mask: Tensor | None = None,
        documents: bool = False,
    ) -> Tensor:
        """Final hidden states (batch, seq, hidden) of `input_ids` placed after the cached positions.

        `attention_mask` (batch, cached + seq), 1 = real token, 0 = padding, covers the cached positions
        too (HF's convention). With it, padding keys are hidden and each row's positions count only
        its real tokens, so a left-padded row gets exactly the logits it would get alone.
        `documents` (without cache or attention_mask: packed training windows) keeps attention inside
        each document, a BOS starting the next one (see `document_mask`).
        """
        if cache is not None and len(cache) != len(self.layers):
            raise FidelError(f"KV cache has {len(cache)} layers, the model has {len(self.layers)}")
        offset = cache[0].length if cache else 0
        seq = input_ids.shape[1]
        if offset + seq > self.max_positions:
            raise FidelError(
                f"{seq} tokens after {offset} cached positions exceed the model's context of"
                f" {self.max_positions} (max_position_embeddings)"
            )
        x = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is None:
            positions = torch.arange(offset, offset + seq, device=input_ids.device)
            cos, sin = self.rotary_emb(positions, x.dtype)
            if documents and cache is None:
                mask = document_mask(input_ids, self.bos_token_id)
        else:
            positions, mask = padded_positions_and_mask(attention_mask, input_ids.shape[0], offset, seq)
            cos, sin = (t.unsqueeze(1) for t in self.rotary_emb(positions, x.dtype))
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[index], mask)
        return self.norm(x)


def document_mask(input_ids: Tensor, bos_token_id: int) -> Tensor:
    """Causal attention within documents (batch, 1, seq, seq): each BOS starts a new document, and the
    tokens before a window's first BOS (the tail of an earlier document) form one of their own.

    RoPE scores depend only on the distance between query and key, so a document anywhere in a packed
    window gets the logits it would get alone at position 0 (a test checks this)."""
    starts = (input_ids == bos_token_id).cumsum(dim=-1)
    same = starts[:, :, None] == starts[:, None, :]
    return torch.tril(same).unsqueeze(1)


def padded_positions_and_mask(
    attention_mask: Tensor, batch: int, offset: int, seq: int
) -> tuple[Tensor, Tensor]:
    """Per-row positions (batch, seq) and the attention mask (batch, 1, seq, offset + seq) of a padded batch.

    A real token sees the real tokens at or before it; a padding query sees only itself, so no row
    of the softmax is empty (its output is never used).
    """
    if attention_mask.shape != (batch, offset + seq):
        raise FidelError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, offset + seq)}"
            " (batch, cached + new positions)"
        )
    valid = attention_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]
    keys = torch.arange(offset + seq, device=attention_mask.device)
    queries = keys[offset:, None]
    mask = ((keys[None, :] <= queries) & valid[:, None, :]) | (keys[None, :] == queries)
    return positions, mask.unsqueeze(1)


class LlamaForCausalLM(nn.Module):
    """Decoder-only language model with HF Llama's parameter names; `lm_head` tied to the embedding."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_chunk_tokens = DEFAULT_CHUNK_TOKENS
        """Tokens per chunk of the fused output-projection loss; 0 computes all logits first."""
        self.document_masking = False
        """Attention stays inside each document of an uncached, unpadded input (training windows)."""
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) matrices and embedding; output projections scaled by 1/sqrt(2·layers)."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def new_cache(self) -> list[KVCache]:
        """An empty KV cache, one entry per layer, for incremental decoding."""
        return [KVCache() for _ in self.model.layers]

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        cache: list[KVCache] | None = None,
        attention_mask: Tensor | None = None,
        reduction: str = "mean",
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Logits of the next token at every position of `input_ids` (batch, seq).

        `targets` (batch, seq) are the next tokens themselves, already shifted: targets[:, t] is the
        token that follows input_ids[:, t]; IGNORE_INDEX (-100) positions do not count. (HF's `labels`
        equal the inputs and are shifted inside; here the data loader shifts, once.) `cache` is
        extended in place with the new positions. `attention_mask` (batch, cached + seq; 0 = padding)
        serves left-padded batches (see `LlamaModel.forward`).

        With targets and `loss_chunk_tokens` > 0 the loss comes from `fidellm.models.loss` chunk by chunk
        and the logits are not returned (None); a LoRA- or quantization-wrapped `lm_head` always gives
        logits. `reduction` "none" gives the loss per token (batch, seq; 0 where ignored) instead of the
        mean, as evaluation needs. `logits_to_keep` N > 0 (HF's argument) projects only the last N
        positions to the vocabulary (and scores only their targets): a prefill or a scorer that needs a
        few positions skips the output matrix's work on the rest.
        """
        check_reduction(reduction)
        hidden = self.model(input_ids, cache, attention_mask, self.document_masking)
        if logits_to_keep:
            hidden, targets = keep_last(hidden, targets, logits_to_keep)
        if targets is not None and self.loss_chunk_tokens and type(self.lm_head) is nn.Linear:
            chunked = linear_cross_entropy if reduction == "mean" else token_cross_entropy
            return LMOutput(None, chunked(hidden, self.lm_head.weight, targets, self.loss_chunk_tokens))
        logits = self.lm_head(hidden)
        return LMOutput(logits, logits_loss(logits, targets, reduction))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied embedding counts once); without the token embedding and an untied
        lm_head when `exclude_embeddings`."""
        unique = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in unique.values())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
            if self.lm_head.weight is not self.model.embed_tokens.weight:
                total -= self.lm_head.weight.numel()
        return total


PRESET_DEPTHS: dict[str, int] = {"tiny": 3, "25m": 6, "chat-512": 8, "85m": 11, "125m": 12, "300m": 17}
"""Preset name -> depth. `chat-512` is the design notes' conversational shape (512 / 8 layers / 1536)."""

NOMINAL_PARAMS: dict[str, tuple[int, bool]] = {
    "tiny": (1_500_000, True),
    "25m": (25_000_000, False),
    "85m": (85_000_000, False),
    "125m": (125_000_000, False),
    "300m": (300_000_000, False),
}
"""Parameter count a preset's name promises and whether it excludes embeddings (at a 32,000 vocab)."""

NAME_TOLERANCE = 0.15
"""How far (relative) a preset's true count may sit from the count in its name."""


def config_for_depth(depth: int, vocab_size: int, max_position_embeddings: int = 2048) -> LlamaConfig:
    """The shape of the depth knob: hidden 64·d, d heads of 64 (MHA), FFN 3·hidden, vocab padded to 64."""
    if depth < 1:
        raise FidelError(f"model depth must be at least 1, got {depth}")
    hidden = 64 * depth
    return LlamaConfig(
        vocab_size=pad_vocab(vocab_size),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=depth,
        num_attention_heads=depth,
        num_key_value_heads=depth,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
    )


def preset(name: str, vocab_size: int, max_position_embeddings: int = 2048) -> LlamaConfig:
    """The named preset's config for a tokenizer of `vocab_size` ids (padded up to a multiple of 64)."""
    if name not in PRESET_DEPTHS:
        raise FidelError(f"unknown model preset {name!r}; choose one of {', '.join(PRESET_DEPTHS)}")
    return config_for_depth(PRESET_DEPTHS[name], vocab_size, max_position_embeddings)


def count_parameters(config: LlamaConfig) -> tuple[int, int]:
    """(total, without embeddings) of a model built from `config`, counted on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.num_parameters(), model.num_parameters(exclude_embeddings=True)


def preset_table(vocab_size: int = 32000) -> list[dict[str, Any]]:
    """One row per preset: its shape and true parameter counts at `vocab_size`."""
    rows = []
    for name in PRESET_DEPTHS:
        config = preset(name, vocab_size)
        total, non_embedding = count_parameters(config)
        rows.append(
            {
                "name": name,
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "heads": config.num_attention_heads,
                "kv_heads": config.num_key_value_heads,
                "head_dim": config.head_dim,
                "ffn": config.intermediate_size,
                "vocab": config.vocab_size,
                "params": total,
                "params_non_embedding": non_embedding,
            }
        )
    return rows


def format_preset_table(vocab_size: int = 32000) -> str:
    """The preset table as Markdown (parameters in millions)."""
    lines = [
        f"Presets at vocab {vocab_size} (tied embedding counted once)",
        "",
        "| preset | layers | hidden | heads | kv heads | head_dim | ffn | params | non-embedding |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in preset_table(vocab_size):
        lines.append(
            f"| {row['name']} | {row['layers']} | {row['hidden']} | {row['heads']} | {row['kv_heads']}"
            f" | {row['head_dim']} | {row['ffn']} | {row['params'] / 1e6:.2f}M"
            f" | {row['params_non_embedding'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_preset_table())
