"""What readers yield: `RawRecord` (one parsed record) or `Rejection` (an unusable record, and why)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Mine = Callable[[], bool]


@dataclass(frozen=True)
class Rejection:
    """A record that could not be used: where it is, and why (reason is a short machine-readable name).
    `records` is how many source records it stands for: 1, or a whole group's members when a `group_by`
    document is rejected (so rejected rows add up to the rows read)."""

    source: str
    path: str
    line: int | None
    reason: str
    detail: str
    records: int = 1

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{self.source}: {where}: {self.reason}: {self.detail}"


@dataclass
class RawRecord:
    """One parsed record: its first line in the file (1-based; row number for parquet; None where unknown),
    a per-file key (the 0-based record index, or the SQuAD part id like `ctx3`), and its fields."""

    line: int | None
    key: str
    fields: dict[str, Any] = field(default_factory=dict)


def bad_utf8(source: str, path: Path, line: int, raw: bytes) -> Rejection:
    """The `invalid_utf8` rejection of line `line`, naming the column of its first bad byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = f"bytes at column {error.start + 1} are not UTF-8 ({error.reason})"
    return Rejection(source, str(path), line, "invalid_utf8", detail)
