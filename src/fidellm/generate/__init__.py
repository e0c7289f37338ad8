"""Generation: KV-cache decoding (engine), its sampling math (sampling), UTF-8-safe streaming (stream)."""

from __future__ import annotations

from fidellm.generate.engine import (
    BatchDecoder,
    GenerationConfig,
    GenerationResult,
    generate,
    stream_generate,
)
from fidellm.generate.stream import TokenStream, make_detokenizer

__all__ = [
    "BatchDecoder",
    "GenerationConfig",
    "GenerationResult",
    "TokenStream",
    "generate",
    "make_detokenizer",
    "stream_generate",
]
