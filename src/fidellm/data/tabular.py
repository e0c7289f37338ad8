"""Tabular readers: csv/tsv (Python's csv module) and parquet (pyarrow), streamed as records or rejections."""

from __future__ import annotations

import csv
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fidellm.data.compressed import COMPRESSED_SUFFIXES, decode_line, iter_chunks, iter_raw_lines
from fidellm.data.records import Mine, RawRecord, Rejection, bad_utf8
from fidellm.errors import FidelError


def missing_columns(path: Path, missing: list[str], found: list[str]) -> FidelError:
    """The error for a header (or parquet schema) that lacks columns the source needs."""
    wanted = ", ".join(repr(m) for m in missing)
    return FidelError(f"{path}: column {wanted} not found; columns: {', '.join(found) or '(none)'}")


def _set_csv_limit() -> None:
    """Allow fields as large as the platform permits (one news article per cell exceeds the 128 KiB limit)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


Rows = Iterator[tuple[int, int, list[str] | str]]
"""(first line, last line, fields or what is wrong with the record's quoting) of each record."""
Lines = Callable[[int], Iterator[tuple[int, str]]]
"""The numbered text lines of a file after line `n` (0: all of them), read afresh on each call."""


def _tsv_rows(lines: Lines, dialect: dict[str, Any]) -> Rows:
    """tsv: each line is one record, its quotes honoured within the line; blank lines are no records."""
    for number, text in lines(0):
        if not text.strip():
            continue
        try:
            row: list[str] | str = next(csv.reader([text], **dialect), [])
        except csv.Error as error:
            row = f"broken quoting ({error})"
            if "end of data" in str(error):
                row = "a quoted field does not close on its line (a tsv record is one line)"
        yield number, number, row


def _csv_rows(lines: Lines, dialect: dict[str, Any]) -> Rows:
    """csv (RFC 4180): a quoted field may span lines; blank lines are no records. After broken quoting the
    csv module resumes at the next line. A quoted field still open at the end of the file would swallow
    every record after it, so only its record's first line is rejected and the lines after it are read
    again."""
    last = [""]  # the line the csv module read last: a record's last line when it returns one
    end = 0  # the last line of the previous record

    def feed(after: int) -> Iterator[str]:
        for _, text in lines(after):
            last[0] = text
            yield text + "\n"

    while True:
        after = end
        reader = csv.reader(feed(after), **dialect)
        while True:
            try:
                row: list[str] | str = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                if "end of data" in str(error):
                    break
                row = f"broken quoting ({error})"
            start, end = end + 1, after + reader.line_num
            if start < end or last[0].strip():
                yield start, end, row
        start, eof = end + 1, after + reader.line_num
        detail = f"the lines after line {start} are read again as records"
        yield start, start, f"a quoted field does not close before the end of the file (line {eof}); {detail}"
        end = start


def read_delimited(
    path: Path, source: str, mine: Mine, options: dict[str, Any], fmt: str, required: list[str]
) -> Iterator[RawRecord | Rejection]:
    """csv/tsv with Python's csv module, strict about quotes. A tsv record is one line (quotes are honoured
    within it, so files written by pandas read the same), so an unclosed quote cannot merge the next lines
    into one field unseen; a csv quoted field may span lines. A record with broken quoting is rejected
    (`bad_quoting`) with its first line and the lines it spans. Blank lines are skipped, as in jsonl. Every
    line is decoded strictly; a record touching a line that is not UTF-8 is rejected. The `required`
    columns must exist in the header."""
    _set_csv_limit()
    bad_lines: dict[int, bytes] = {}

    def text_lines(after: int) -> Iterator[tuple[int, str]]:
        for number, raw in enumerate(iter_raw_lines(path), start=1):
            if number <= after:
                continue
            text = decode_line(raw)
            if text is None:
                bad_lines[number] = raw
                text = raw.decode("utf-8", errors="replace")
            yield number, text

    dialect = {
        "delimiter": options.get("delimiter", "," if fmt == "csv" else "\t"),
        "quoting": csv.QUOTE_NONE if options.get("quoting") == "none" else csv.QUOTE_MINIMAL,
        "strict": True,
    }
    rows = (_csv_rows if fmt == "csv" else _tsv_rows)(text_lines, dialect)
    if options.get("header", True):
        first, last, header = next(rows, (0, 0, None))
        if header is None:
            raise FidelError(f"{path} has no header line")
        if isinstance(header, str):
            raise FidelError(f"{path}:{first}: the header line has {header}")
        if any(n in bad_lines for n in range(first, last + 1)):
            raise FidelError(f"{path}:{first}: the header line is not UTF-8")
    elif options.get("columns"):
        header = list(options["columns"])
    else:
        raise FidelError(f"{path}: header: false needs options.columns (the column names)")
    missing = [name for name in required if name not in header]
    if missing:
        raise missing_columns(path, missing, header)
    for index, (start, end, row) in enumerate(rows):
        if not mine():
            continue
        bad = next((n for n in range(start, end + 1) if n in bad_lines), None)
        if bad is not None:
            yield bad_utf8(source, path, bad, bad_lines[bad])
        elif isinstance(row, str):
            span = f"line {start}" if start == end else f"lines {start}-{end}"
            yield Rejection(source, str(path), start, "bad_quoting", f"{row}; the record spans {span}")
        elif len(row) != len(header):
            detail = f"{len(row)} fields, the header has {len(header)}"
            yield Rejection(source, str(path), start, "bad_row", detail)
        else:
            yield RawRecord(start, str(index), dict(zip(header, row, strict=True)))


def read_parquet(
    path: Path,
    source: str,
    mine: Mine,
    required: list[str],
    batch_size: int = 4096,
    optional: list[str] | None = None,
) -> Iterator[RawRecord | Rejection]:
    """Parquet, read in batches of the needed columns: `required` ones (all columns when none is) and the
    `optional` ones the file has, such as a per-document licence (a .zst/.gz wrapper is spooled to a temp
    file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryFile() as spool:
        if path.name.endswith(COMPRESSED_SUFFIXES):
            for chunk in iter_chunks(path):
                spool.write(chunk)
            spool.seek(0)
            target: Any = spool
        else:
            if not path.is_file() or path.stat().st_size == 0:
                raise FidelError(f"{path} {'is empty' if path.is_file() else 'does not exist'}")
            target = str(path)
        try:
            parquet = pq.ParquetFile(target)
        except (pa.ArrowException, OSError) as error:
            raise FidelError(f"{path}: not a readable parquet file ({error})") from error
        names = parquet.schema_arrow.names
        missing = [name for name in required if name not in names]
        if missing:
            raise missing_columns(path, missing, names)
        extra = [name for name in optional or [] if name in names and name not in required]
        row = 0
        for batch in parquet.iter_batches(batch_size=batch_size, columns=[*required, *extra] or None):
            for fields in batch.to_pylist():
                row += 1
                if mine():
                    yield RawRecord(row, str(row - 1), fields)
