"""Decoding settings and results, shared by the engine, its row batches and their callers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from fidellm.errors import FidelError
from fidellm.tokenizer.base import TextTokenizer
from fidellm.values import is_integer, is_number

FinishReason = Literal["stop", "length"]
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds `torch.Generator.manual_seed` accepts (a negative one wraps to unsigned 64 bits)."""


def check_seed(seed: int, rows: int = 1) -> None:
    """FidelError unless torch accepts the seed of every row (row i samples with `seed + i`), so a bad
    seed is refused up front instead of failing inside the decoder."""
    high = SEED_MAX - (rows - 1)
    if not SEED_MIN <= seed <= high:
        rows_note = f" with {rows} rows (row i uses seed + i)" if rows > 1 else ""
        raise FidelError(f"generation: seed must be in [{SEED_MIN}, {high}]{rows_note}, got {seed}")


@dataclass
class GenerationConfig:
    """Decoding settings. temperature 0 = greedy; top_k 0 and top_p 1.0 = no filter; repetition_penalty
    1.0 = none (CTRL/HF definition, over prompt and generated ids). `stop_token_ids` None = the EOS
    and BOS ids of the tokenizer and the model config (`default_stop_ids`). `seed` None = drawn from
    torch's global RNG (so `torch.manual_seed` still makes runs repeatable). `add_bos` applies to text
    prompts only."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    add_bos: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._normalize_stops()
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not is_number(value):
                raise FidelError(f"generation: {name} must be a number, got {value!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise FidelError(f"generation: max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise FidelError(f"generation: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise FidelError(f"generation: temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise FidelError(f"generation: top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise FidelError(f"generation: top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise FidelError(f"generation: repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(stop, str) or not stop for stop in self.stop_strings):
            raise FidelError(f"generation: stop strings must be non-empty strings, got {self.stop_strings!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise FidelError(f"generation: seed must be an integer, got {self.seed!r}")
        if self.seed is not None:
            check_seed(self.seed)

    def _normalize_stops(self) -> None:
        """Stops as tuples. One string is one stop string and one id one stop id (as in HF and vLLM):
        tuple("\\n\\n") would have made each character a stop string of its own."""
        stops, ids = self.stop_strings, self.stop_token_ids
        if not isinstance(stops, Iterable):
            raise FidelError(f"generation: stop_strings must be a string or a list of them, got {stops!r}")
        self.stop_strings = (stops,) if isinstance(stops, str) else tuple(stops)
        if ids is None:
            return
        ids = tuple(ids) if isinstance(ids, Iterable) and not isinstance(ids, str) else (ids,)
        if not all(is_integer(i) for i in ids):
            raise FidelError(f"generation: stop_token_ids must be token ids (integers), got {ids!r}")
        self.stop_token_ids = tuple(int(i) for i in ids)


@dataclass
class GenerationResult:
    """One prompt's output. `token_ids` are all sampled ids (a stop token included); `text` is their
    decode, cut before the stop string and without the stop token, and without a last character the
    length limit cut in the middle (no trailing U+FFFD). `stop` names what stopped it."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    stop: str | int | None = None


def default_stop_ids(model: nn.Module, tokenizer: TextTokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS id, the model config's `eos_token_id`s (chat turns) and the BOS ids of both:
    training windows separate documents by a BOS alone (`tokenizer.shards`), so a generated BOS ends
    the document; without it a byte model (EOS 255, never trained on) ran on into an unrelated one."""
    config = getattr(model, "config", None)
    config_eos = getattr(config, "eos_token_id", ()) or ()
    if isinstance(config_eos, int):
        config_eos = (config_eos,)
    config_bos = getattr(config, "bos_token_id", None)
    bos = (tokenizer.bos_id,) if config_bos is None else (tokenizer.bos_id, config_bos)
    return tuple(dict.fromkeys((tokenizer.eos_id, *config_eos, *bos)))
