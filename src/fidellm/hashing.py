"""Hashes that are the same in every process, run and machine (unlike Python's `hash`).

Dedup keys, decontamination n-grams, document splits and sampling all depend on them, so a run reproduces
exactly whatever the worker count or the machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def stable_hash64(text: str, person: bytes = b"") -> int:
    """64-bit blake2b of the UTF-8 text; `person` separates hash families (e.g. words vs whole units)."""
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=person).digest(), "little"
    )


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
