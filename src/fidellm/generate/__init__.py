"""Generation: KV-cache decoding (engine), its sampling math (sampling), UTF-8-safe streaming (stream).

The names below load on first use (PEP 562), so importing a submodule such as `fidellm.generate.cli`
(which every `fidellm` command does, `--help` included) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fidellm.generate.engine import (
        BatchDecoder,
        GenerationConfig,
        GenerationResult,
        generate,
        stream_generate,
    )
    from fidellm.generate.stream import TokenStream, make_detokenizer

_HOMES = {
    "BatchDecoder": "engine",
    "GenerationConfig": "engine",
    "GenerationResult": "engine",
    "generate": "engine",
    "stream_generate": "engine",
    "TokenStream": "stream",
    "make_detokenizer": "stream",
}

__all__ = [
    "BatchDecoder",
    "GenerationConfig",
    "GenerationResult",
    "TokenStream",
    "generate",
    "make_detokenizer",
    "stream_generate",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"fidellm.generate.{_HOMES[name]}"), name)
