"""H-Net configuration: the layout string, per-stage widths and the SSM / attention settings.

The layout string nests one bracket per stage, e.g. `m4,[T22],m4` (1 stage: a Mamba-2 encoder and
decoder of 4 layers around a 22-layer Transformer main network) or `m4,[T1m4,[T26],m4T1],m4`
(2 stages). Letters: `m` Mamba-2 without MLP, `M` Mamba-2 + SwiGLU, `t` attention without MLP,
`T` attention + SwiGLU; each letter is followed by its layer count. Per-stage lists (`d_model`,
`d_intermediate`, `num_heads`, `rotary_emb_dim`, `window_size`) have one entry per nesting level,
outermost first, as in the reference implementation's config JSON.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from fidellm.errors import FidelError
from fidellm.tokenizer.special import BYTE_BOS_ID, BYTE_EOS_ID
from fidellm.values import is_integer, is_number


def _whole(value: Any) -> bool:
    """An integer, or a float holding one (1024.0); never a bool."""
    return is_integer(value) or (is_number(value) and math.isfinite(value) and float(value).is_integer())


WRONG_TYPE = "model config (hnet): a field has the wrong type:"
"""As `models.factory.config_from_dict` words the type errors it catches from configs."""

Layout = list  # nested: [encoder: str, inner: Layout, decoder: str] or [main: str]

_RUN = re.compile(r"([mMtT])(\d+)")
LAYER_SPEC = re.compile(r"(?:[mMtT]\d+)+")


def parse_layout(text: str) -> Layout:
    """`m4,[T1m4,[T26],m4T1],m4` -> ['m4', ['T1m4', ['T26'], 'm4T1'], 'm4']; FidelError if malformed."""
    tokens = re.findall(r"\[|\]|,|[^\[\],]+", re.sub(r"\s+", "", text))
    position = 0

    def fail(message: str) -> FidelError:
        return FidelError(f"model config: arch_layout {text!r}: {message}")

    def parse_stage() -> Layout:
        nonlocal position
        items: Layout = []
        while True:
            if position < len(tokens) and tokens[position] == "[":
                position += 1
                items.append(parse_stage())
                if position >= len(tokens) or tokens[position] != "]":
                    raise fail("unbalanced brackets")
                position += 1
            elif position < len(tokens) and LAYER_SPEC.fullmatch(tokens[position]):
                items.append(tokens[position])
                position += 1
            else:
                found = tokens[position] if position < len(tokens) else "end of text"
                raise fail(f"expected a layer run like 'm4' or '[', found {found!r}")
            if position < len(tokens) and tokens[position] == ",":
                position += 1
                continue
            break
        if len(items) == 1 and isinstance(items[0], str):
            return items
        if (
            len(items) == 3
            and isinstance(items[0], str)
            and isinstance(items[2], str)
            and isinstance(items[1], list)
        ):
            return items
        raise fail("each level must be 'encoder,[inner],decoder' or a single main-network run")

    layout = parse_stage()
    if position != len(tokens):
        raise fail(f"unexpected {tokens[position]!r}")
    return layout


def expand_layers(spec: str) -> list[str]:
    """'T1m4' -> ['T', 'm', 'm', 'm', 'm']: one letter per layer, in order."""
    return [letter for letter, count in _RUN.findall(spec) for _ in range(int(count))]


def layout_depth(layout: Layout) -> int:
    """Number of nesting levels (1 + the number of dynamic-chunking stages)."""
    return 1 if len(layout) == 1 else 1 + layout_depth(layout[1])


def stage_specs(layout: Layout) -> list[list[str]]:
    """The layer specs at each level: [[enc, dec], [enc, dec], ..., [main]]."""
    return [[layout[0]]] if len(layout) == 1 else [[layout[0], layout[2]], *stage_specs(layout[1])]


@dataclass
class HNetConfig:
    """Shape of an HNetForCausalLM; field names follow the reference config where it has one."""

    arch_layout: str
    d_model: list[int]
    d_intermediate: list[int]
    num_heads: list[int]
    rotary_emb_dim: list[int]
    window_size: list[int]
    """Attention reaches back this many positions (key ≥ query − window); -1 = full causal."""
    vocab_size: int = 256
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64
    """SSD scan chunk length: memory grows with batch·seq·chunk_size·heads."""
    target_ratio: list[int] = field(default_factory=list)
    """Target compression N per chunking stage; empty = 6 for 1 stage, 3 per stage otherwise."""
    ratio_loss_weight: float = 0.03
    max_position_embeddings: int = 8192
    """Context length in bytes (the training sequence length)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bos_token_id: int = BYTE_BOS_ID
    eos_token_id: int = BYTE_EOS_ID
    pad_token_id: int = BYTE_EOS_ID

    def __post_init__(self) -> None:
        self._check_types()
        self.layout = parse_layout(self.arch_layout)
        levels = layout_depth(self.layout)
        for name in ("d_model", "d_intermediate", "num_heads", "rotary_emb_dim", "window_size"):
            setattr(self, name, [int(v) for v in getattr(self, name)])
            if len(getattr(self, name)) != levels:
                raise FidelError(
                    f"model config: {name} has {len(getattr(self, name))} entries, arch_layout"
                    f" {self.arch_layout!r} has {levels} levels"
                )
        if not self.target_ratio:
            self.target_ratio = [6] if levels == 2 else [3] * (levels - 1)
        self.target_ratio = [int(v) for v in self.target_ratio]
        if len(self.target_ratio) != levels - 1 or min(self.target_ratio, default=2) < 2:
            raise FidelError(f"model config: target_ratio needs {levels - 1} entries, each at least 2")
        for name in ("vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) < 1:
                raise FidelError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.max_position_embeddings < 1:
            raise FidelError("model config: max_position_embeddings must be positive")
        for name in ("rope_theta", "norm_eps"):  # theta <= 0 made NaN rotary tables, silently
            value = getattr(self, name)
            if not is_number(value) or not 0 < value < math.inf:
                raise FidelError(f"model config: {name} must be a positive number, got {value!r}")
        for stage, specs in enumerate(stage_specs(self.layout)):
            self._check_stage(stage, "".join(specs))
        if any(b < a for a, b in zip(self.d_model, self.d_model[1:], strict=False)):
            raise FidelError(f"model config: d_model {self.d_model} must not shrink towards the inside")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise FidelError(f"model config: {name} {getattr(self, name)} is outside the vocabulary")

    def _check_types(self) -> None:
        """Each field of the right kind, named when not (a bare 64 for a per-level list raised a TypeError
        traceback, 64.5 was cut to 64 and a string of digits was read digit by digit)."""
        if not isinstance(self.arch_layout, str):
            raise FidelError(f"{WRONG_TYPE} arch_layout must be a string, got {self.arch_layout!r}")
        lists = ("d_model", "d_intermediate", "num_heads", "rotary_emb_dim", "window_size", "target_ratio")
        for name in lists:
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_whole(v) for v in value):
                raise FidelError(
                    f"{WRONG_TYPE} {name} must be a list of integers (one per level), got {value!r}"
                )
        names = ("vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
        for name in (*names, "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            if not _whole(getattr(self, name)):
                raise FidelError(f"{WRONG_TYPE} {name} must be an integer, got {getattr(self, name)!r}")
            setattr(self, name, int(getattr(self, name)))
        weight = self.ratio_loss_weight
        if not is_number(weight) or not 0 <= weight < math.inf:
            raise FidelError(f"model config (hnet): ratio_loss_weight must be a number >= 0, got {weight!r}")

    def _check_stage(self, stage: int, letters: str) -> None:
        d = self.d_model[stage]
        if d < 1:
            raise FidelError(f"model config: d_model[{stage}] must be positive, got {d}")
        if any(c in letters for c in "MT") and self.d_intermediate[stage] < 1:
            raise FidelError(f"model config: stage {stage} has MLP layers (M/T) but d_intermediate 0")
        if any(c in letters for c in "mM") and (self.expand * d) % self.headdim:
            raise FidelError(
                f"model config: expand·d_model[{stage}] is not a multiple of headdim {self.headdim}"
            )
        if any(c in letters for c in "mM") and (self.expand * d // self.headdim) % self.ngroups:
            raise FidelError(f"model config: stage {stage}'s SSM heads are not a multiple of ngroups")
        if any(c in letters for c in "tT"):
            heads = self.num_heads[stage]
            if heads < 1 or d % heads:
                raise FidelError(f"model config: d_model[{stage}] {d} is not a multiple of num_heads {heads}")
            rotary = self.rotary_emb_dim[stage]
            if rotary < 0 or rotary % 2 or rotary > d // heads:
                raise FidelError(
                    f"model config: rotary_emb_dim[{stage}] {rotary} must be even and at most the head dim"
                )
            if self.window_size[stage] < -1:
                raise FidelError(f"model config: window_size[{stage}] must be -1 (full) or non-negative")

    @property
    def num_stages(self) -> int:
        """Number of dynamic-chunking stages (0 would be an isotropic model)."""
        return layout_depth(self.layout) - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the round trip of `from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HNetConfig:
        """Build from a dict with (a superset of) this class's field names."""
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        if missing := [name for name in required if name not in data]:
            raise FidelError(f"model config: missing field(s) {', '.join(missing)}")
        return cls(**{key: value for key, value in data.items() if key in names})
