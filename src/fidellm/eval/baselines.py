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
import zlib
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
GZIP_WBITS = 31
"""zlib's window bits for a gzip-wrapped deflate stream (15-bit window + 16)."""


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


CPU_SECONDS_PER_10MB: dict[str, float] = {"xz": 8.0, "zstd": 7.0, "gzip": 2.0, "bz2": 0.6}
"""Rough CPU seconds of each compressor per 10 MB of Amharic text (one EPYC core): the slowest jobs of
the pool start first."""


def compressed_bits_per_char(
    text: str, context: str = "", names: tuple[str, ...] = tuple(COMPRESSORS)
) -> dict[str, float]:
    """{compressor: bits per character of `text`} alone (context "") or after `context`."""
    return compressed_bits_per_char_runs(text, [context], names)[0]


def compressed_bits_per_char_runs(
    text: str, contexts: list[str], names: tuple[str, ...] = tuple(COMPRESSORS)
) -> list[dict[str, float]]:
    """`compressed_bits_per_char` of `text` after each of `contexts`, every compression one job of a
    single thread pool (the compressors release the GIL), the slowest first, so two cores stay busy to
    the end instead of waiting for each context's slowest compressor in turn."""
    data = text.encode("utf-8")
    jobs: dict[tuple[int, str], tuple[str, bytes, int]] = {}  # (context, key) -> (name, payload, primer)
    for index, context in enumerate(contexts):
        primer = context.encode("utf-8")
        for name in names:
            forked = name == "gzip" and bool(primer)  # both sizes from one pass (_gzip_sizes)
            jobs[index, name] = (name, primer + data, len(primer) if forked else 0)
            if primer and not forked:
                jobs[index, f"{name} primer"] = (name, primer, 0)
    order = sorted(jobs, key=lambda key: -len(jobs[key][1]) * CPU_SECONDS_PER_10MB.get(jobs[key][0], 1.0))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = {key: pool.submit(_sizes, *jobs[key]) for key in order}
    sizes = {key: future.result() for key, future in futures.items()}
    chars = max(1, len(text))
    return [
        {name: 8.0 * (sizes[index, name][0] - _primer_size(sizes, index, name)) / chars for name in names}
        for index in range(len(contexts))
    ]


def _primer_size(sizes: dict[tuple[int, str], tuple[int, int]], index: int, name: str) -> int:
    """The compressed size of context `index` alone (0 for no context), from its own job or gzip's fork."""
    if (index, f"{name} primer") in sizes:
        return sizes[index, f"{name} primer"][0]
    return sizes[index, name][1]


def _sizes(name: str, payload: bytes, primer_bytes: int) -> tuple[int, int]:
    """(compressed size of `payload`, size of its first `primer_bytes` alone): the second only for gzip
    (one pass, forked), else 0."""
    if name == "gzip" and primer_bytes:
        return _gzip_sizes(payload, primer_bytes)
    return len(COMPRESSORS[name](payload)), 0


def _gzip_sizes(payload: bytes, primer_bytes: int) -> tuple[int, int]:
    """gzip sizes of `payload` and of its first `primer_bytes`, from one pass over the primer: the stream
    is forked (zlib's copy) where the primer ends, in half the time of two calls. The sizes are those of
    COMPRESSORS["gzip"]: the same deflate stream (zlib's output does not depend on how its input is fed)
    inside a 10-byte header and an 8-byte trailer (tests compare them)."""
    stream = zlib.compressobj(9, zlib.DEFLATED, GZIP_WBITS)
    head = stream.compress(payload[:primer_bytes])
    fork = stream.copy()
    whole = len(head) + len(stream.compress(payload[primer_bytes:])) + len(stream.flush())
    return whole, len(head) + len(fork.flush())


def compressor_results(text: str, context: str, label: str = "flores") -> list[TaskResult]:
    """TaskResults (bits/char, lower is better) of every compressor on `text`, alone and with `context`."""
    suffixes = ["", "+train"] if context else [""]
    runs = zip(suffixes, compressed_bits_per_char_runs(text, ["", context][: len(suffixes)]), strict=True)
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
