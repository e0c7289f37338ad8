"""Baselines every report shows beside a model: general-purpose compressors and published anchors.

Compressors are measured here, on the same text: bits per character = 8 × compressed bytes / characters.
"With context" primes the compressor with training text: the cost of the evaluation text is
size(compress(context + text)) − size(compress(context)), the extra bytes it needs once the training
text has been seen (how far back each compressor can look differs: gzip 32 KB, bz2 900 KB blocks,
xz and zstd many MB; that is part of what the number says). The published anchors are copied from
../shared/design/evaluation.md and labelled as published, never recomputed.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from fidellm.eval.results import TaskResult

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "xz": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    "zstd": lambda data: zstandard.ZstdCompressor(level=19).compress(data),
}
"""Compressor name -> compress(bytes) at its strongest standard setting."""


@dataclass(frozen=True)
class Anchor:
    """A published FLORES amh score: `value` of `metric` for `model`, from `source`."""

    model: str
    metric: str
    value: float
    source: str


PUBLISHED_ANCHORS: tuple[Anchor, ...] = (
    Anchor("bigram", "flores_second_half_bits", 111.87, "Goldfish paper (Chang et al. 2024), evaluation.md"),
    Anchor("Goldfish-10MB", "flores_second_half_bits", 121.29, "Goldfish paper, evaluation.md"),
    Anchor("XGLM-4.5B", "flores_second_half_bits", 110.54, "Goldfish paper, issue 3"),
    Anchor("Goldfish-100MB", "flores_second_half_bits", 95.19, "Goldfish paper, evaluation.md"),
    Anchor("Goldfish-1000MB", "flores_second_half_bits", 83.36, "Goldfish paper, evaluation.md"),
)
"""FLORES-200 amh second-half bits (dev + devtest, 2,009 lines; lower is better), as published."""


def compressed_bits_per_char(
    text: str, context: str = "", names: tuple[str, ...] = tuple(COMPRESSORS)
) -> dict:
    """{compressor: bits per character of `text`} alone (context "") or after `context`. The compressors
    release the GIL, so the calls run in threads, one per core."""
    data = text.encode("utf-8")
    primer = context.encode("utf-8")

    def size(name: str, payload: bytes) -> int:
        return len(COMPRESSORS[name](payload))

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        whole = {name: pool.submit(size, name, primer + data) for name in names}
        primed = {name: pool.submit(size, name, primer) for name in names if primer}
    chars = max(1, len(text))
    return {
        name: 8.0 * (whole[name].result() - (primed[name].result() if primer else 0)) / chars
        for name in names
    }


def compressor_results(text: str, context: str, label: str = "flores") -> list[TaskResult]:
    """TaskResults (bits/char, lower is better) of every compressor on `text`, alone and with `context`."""
    runs = [("", compressed_bits_per_char(text))]
    if context:
        runs.append(("+train", compressed_bits_per_char(text, context)))
    return [
        TaskResult(
            f"{label}/{name}{suffix}",
            "bits_per_char",
            value,
            len(text),
            "all",
            higher_is_better=False,
            details={"context_chars": len(context) if suffix else 0},
        )
        for suffix, values in runs
        for name, value in values.items()
    ]
