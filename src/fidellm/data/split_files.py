"""Reading the split files `fidellm data prepare` writes: RUN/data/splits/<split>/*.jsonl.gz, one
datatrove JsonlWriter record per line ({"text", "id", "metadata": {"source", "weight", ...}}).

The tokenizer, the token shards, the evaluation and the split filling read them here, so each record is
checked the same way and a bad one is a FidelError naming the file, line and field. Standard-library JSON:
the GPU device image, where token shards are rebuilt, has no orjson (tests/test_device_image.py).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fidellm.data.readers import lone_surrogate
from fidellm.errors import FidelError
from fidellm.paths import RunLayout


@dataclass(frozen=True)
class SplitDocument:
    """One document of a prepared split, with where it came from (for error messages)."""

    text: str
    id: str
    source: str
    weight: float
    location: str  # "FILE:LINE", for error messages
    line: int  # its 1-based line number in the file


def split_files(run_dir: str | os.PathLike, split: str) -> list[Path]:
    """The sorted *.jsonl.gz files of RUN/data/splits/<split>; clear errors when there are none."""
    directory = RunLayout(run_dir).split_dir(split)
    if not directory.is_dir():
        raise FidelError(f"split directory {directory} does not exist (run `fidellm data prepare RUN` first)")
    files = sorted(directory.glob("*.jsonl.gz"))
    if not files:
        raise FidelError(f"split directory {directory} holds no *.jsonl.gz shards")
    for path in files:
        _check_not_empty(path)
    return files


def _check_not_empty(path: Path) -> None:
    """Refuse a 0-byte split file: gzip would read it as an empty split (every writer leaves a header)."""
    if path.stat().st_size == 0:
        raise FidelError(f"{path}: empty file; re-run `fidellm data prepare RUN`")


def read_split_file(path: Path) -> Iterator[SplitDocument]:
    """Documents of one datatrove JsonlWriter file; a malformed line raises naming file, line and field."""
    _check_not_empty(path)
    try:
        with gzip.open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield _parse_line(line, path, number)
    except (OSError, EOFError) as error:
        raise FidelError(f"{path}: cannot read gzip file: {error}") from error


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: only then can a parsed string hold a lone one (a pair is fine)."""


def _parse_line(line: bytes, path: Path, number: int) -> SplitDocument:
    """Validate one JSON line: "text" str, "id" str, metadata.source str, metadata.weight finite >= 0."""
    location = f"{path}:{number}"
    try:
        record = json.loads(line)
    except ValueError as error:
        raise FidelError(f"{location}: not valid JSON: {error}") from error
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise FidelError(f"{location}: field 'text' is missing or not a string")
    if _SURROGATE_ESCAPE.search(line) and (found := lone_surrogate(record)):
        raise FidelError(f"{location}: {found}, which is not text (UTF-8 cannot encode it)")
    doc_id = record.get("id")
    if not isinstance(doc_id, str):
        raise FidelError(f"{location}: field 'id' is missing or not a string")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise FidelError(f"{location}: field 'metadata' is not an object")
    source = metadata.get("source", "unknown")
    if not isinstance(source, str):
        raise FidelError(f"{location}: field 'metadata.source' is not a string")
    weight = metadata.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise FidelError(f"{location}: field 'metadata.weight' must be a finite number >= 0, got {weight!r}")
    return SplitDocument(record["text"], doc_id, source, float(weight), location, number)
