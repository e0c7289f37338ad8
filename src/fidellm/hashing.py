"""Hashes that are the same in every process, run and machine (unlike Python's `hash`).

Dedup keys, MinHash shingles, decontamination n-grams, document splits and sampling all depend on them, so
a run reproduces exactly whatever the worker count or the machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def stable_hash64(text: str, person: bytes = b"") -> int:
    """64-bit blake2b of the UTF-8 text; `person` separates hash families (e.g. words vs whole units)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person).digest(), "little"
    )


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every n-gram of the word numbers or word hashes `ids` (empty when there are fewer
    than n): a polynomial rolling hash with a splitmix64 finish, vectorized over the whole text."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h = h * _MULT + ids[k : k + m]
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


def unit_interval(key: str) -> float:
    """A deterministic number in [0, 1) from a string: splits and sampling by a hash of the document id."""
    return stable_hash64(key) / 2.0**64


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (provenance in reports and shard metadata)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
