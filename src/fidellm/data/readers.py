"""Format readers: plain, .zst and .gz files → records or `Rejection`s, streamed, never silently lossy.

Every reader yields `RawRecord(line, key, fields)` for the records its caller owns and `Rejection` for owned
records that cannot be used (bad JSON, bad UTF-8, wrong column count). Ownership is decided by the `mine`
callback, called exactly once per record in file order *before* the record is decoded where the format allows
it (jsonl, txt, conll), so that a rank of a sharded read only pays for its own records. File-level problems
(missing, empty, corrupt compressed stream, missing csv column, malformed json/xml file) raise `FidelError`.
The record types live in `fidellm.data.records`, the csv/tsv and parquet readers in `fidellm.data.tabular`.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fidellm.data.compressed import decode_line, iter_raw_lines, read_text_bytes
from fidellm.data.records import Mine, RawRecord, Rejection, bad_utf8
from fidellm.data.tabular import read_delimited, read_parquet
from fidellm.errors import FidelError

SUPPORTED_FORMATS = ("jsonl", "json", "txt", "csv", "tsv", "parquet", "xml", "conll", "squad")
TXT_UNITS = ("file", "paragraph", "line")
FORMAT_OPTIONS: dict[str, frozenset[str]] = {
    "jsonl": frozenset(),
    "json": frozenset({"records"}),
    "txt": frozenset(),
    "csv": frozenset({"delimiter", "header", "columns", "quoting"}),
    "tsv": frozenset({"delimiter", "header", "columns", "quoting"}),
    "parquet": frozenset({"batch_size"}),
    "xml": frozenset({"record_tag"}),
    "conll": frozenset({"column"}),
    "squad": frozenset({"parts"}),
}
SQUAD_PARTS = ("context", "question", "answer")
_SURROGATE = re.compile("[\udc80-\udcff]")
_LONE = re.compile("[\ud800-\udfff]")
_MAYBE_LONE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
"""A JSON escape of a surrogate, or a surrogate itself: then the parsed value may hold a lone one."""


def supported_formats_message() -> str:
    """The list of formats, for error messages."""
    return "supported formats: " + ", ".join(SUPPORTED_FORMATS)


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where (`text`, `messages[0].content`) the first string of a parsed JSON value holds a lone surrogate,
    with it; None when there is none. JSON may escape one (`"\\ud83d"`, a broken emoji in scraped tweets), but
    it is no character: UTF-8 cannot encode it, so it would crash hashing and writing far downstream."""
    if isinstance(value, str):
        bad = _LONE.search(value)
        return f"field {where!r} holds the lone surrogate \\u{ord(bad.group()):04x}" if bad else None
    if isinstance(value, dict):
        if any(isinstance(key, str) and _LONE.search(key) for key in value):
            return f"a key of {f'field {where!r}' if where else 'the record'} holds a lone surrogate"
        children = [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        children = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    else:
        return None
    return next((found for path, item in children if (found := lone_surrogate(item, path))), None)


def _invalid_text(source: str, path: Path, line: int | None, value: Any, raw: str) -> Rejection | None:
    """An `invalid_utf8` Rejection when the record parsed from the JSON text `raw` holds a lone surrogate
    (`raw` is scanned first, so a clean record costs one regex search)."""
    found = lone_surrogate(value) if _MAYBE_LONE.search(raw) else None
    if found is None:
        return None
    return Rejection(source, str(path), line, "invalid_utf8", f"{found}, which UTF-8 cannot encode")


# ---------------------------------------------------------------------------------------------- line formats


def read_jsonl(path: Path, source: str, mine: Mine) -> Iterator[RawRecord | Rejection]:
    """One JSON object per line; blank lines are not records. Decoding happens only for owned lines."""
    index = 0
    for number, raw in enumerate(iter_raw_lines(path), start=1):
        if not raw.strip():
            continue
        key, index = str(index), index + 1
        if not mine():
            continue
        text = decode_line(raw)
        if text is None:
            yield bad_utf8(source, path, number, raw)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            yield Rejection(source, str(path), number, "invalid_json", f"{error.msg} at column {error.colno}")
            continue
        if not isinstance(value, dict):
            kind = type(value).__name__
            yield Rejection(source, str(path), number, "not_an_object", f"a JSON {kind}, not an object")
            continue
        yield _invalid_text(source, path, number, value, text) or RawRecord(number, key, value)


def _blocks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """Blank-line separated blocks of raw lines, with the 1-based number of each block's first line."""
    block: list[bytes] = []
    start = 0
    for number, raw in enumerate(iter_raw_lines(path), start=1):
        if raw.strip():
            if not block:
                start = number
            block.append(raw)
        elif block:
            yield start, block
            block = []
    if block:
        yield start, block


def _decode_block(source: str, path: Path, start: int, block: list[bytes]) -> str | Rejection:
    lines = []
    for offset, raw in enumerate(block):
        text = decode_line(raw)
        if text is None:
            return bad_utf8(source, path, start + offset, raw)
        lines.append(text)
    return "\n".join(lines)


def read_txt(path: Path, source: str, mine: Mine, unit: str) -> Iterator[RawRecord | Rejection]:
    """Plain text: the whole file, blank-line separated paragraphs or single lines become field `text`."""
    if unit == "file":
        if mine():
            raw_lines = list(iter_raw_lines(path))
            decoded = _decode_block(source, path, 1, raw_lines)
            yield decoded if isinstance(decoded, Rejection) else RawRecord(1, "0", {"text": decoded})
        return
    if unit == "paragraph":
        for index, (start, block) in enumerate(_blocks(path)):
            if mine():
                decoded = _decode_block(source, path, start, block)
                yield (
                    decoded
                    if isinstance(decoded, Rejection)
                    else RawRecord(start, str(index), {"text": decoded})
                )
        return
    if unit != "line":
        raise FidelError(f"{path}: unknown txt unit {unit!r}; choose one of {', '.join(TXT_UNITS)}")
    for index, raw in enumerate(iter_raw_lines(path)):
        if mine():
            text = decode_line(raw)
            if text is None:
                yield bad_utf8(source, path, index + 1, raw)
            else:
                yield RawRecord(index + 1, str(index), {"text": text})


def read_conll(path: Path, source: str, mine: Mine, column: int = 0) -> Iterator[RawRecord | Rejection]:
    """CoNLL: one token per line (whitespace-separated columns), sentences separated by blank lines.

    Fields: `tokens`, `tags` (last column) and `text` (tokens joined by single spaces). -DOCSTART- lines are
    document markers, not sentences.
    """
    index = 0
    for start, block in _blocks(path):
        if block[0].startswith(b"-DOCSTART-"):
            block = block[1:]
            start += 1
            if not block:
                continue
        key, index = str(index), index + 1
        if not mine():
            continue
        decoded = _decode_block(source, path, start, block)
        if isinstance(decoded, Rejection):
            yield decoded
            continue
        rows = [line.split() for line in decoded.split("\n")]
        short = next((i for i, row in enumerate(rows) if len(row) <= column), None)
        if short is not None:
            detail = f"token line has {len(rows[short])} columns, column {column} wanted"
            yield Rejection(source, str(path), start + short, "bad_row", detail)
            continue
        tokens = [row[column] for row in rows]
        yield RawRecord(
            start, key, {"tokens": tokens, "tags": [row[-1] for row in rows], "text": " ".join(tokens)}
        )


# ---------------------------------------------------------------------------------------------- json / squad


def _decode_document(path: Path) -> str:
    """The whole file as text; bytes that are not UTF-8 become lone surrogates so the records holding them
    can be found and rejected (never silently replaced)."""
    return read_text_bytes(path).decode("utf-8", errors="surrogateescape")


def _json_error(path: Path, error: json.JSONDecodeError) -> FidelError:
    return FidelError(f"{path}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno})")


def _iter_json_container(text: str, path: Path) -> Iterator[tuple[int, int, str | None, Any]]:
    """(start, end, key, value) of each element of the top-level JSON array (or each key: value of the
    top-level object), parsed one by one so every record knows where it lies in the text."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, 0).end()
    if pos >= len(text) or text[pos] not in "[{":
        raise FidelError(f"{path}: the top-level JSON value is not an array or object")
    is_object, close = text[pos] == "{", "}" if text[pos] == "{" else "]"
    pos = ws.match(text, pos + 1).end()
    try:
        while not text.startswith(close, pos):
            start, key = pos, None
            if is_object:
                key, pos = decoder.raw_decode(text, pos)
                pos = ws.match(text, pos).end()
                if not text.startswith(":", pos):
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
                pos = ws.match(text, pos + 1).end()
            value, pos = decoder.raw_decode(text, pos)
            yield start, pos, key, value
            pos = ws.match(text, pos).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif not text.startswith(close, pos):
                raise json.JSONDecodeError(f"Expecting ',' or '{close}'", text, pos)
    except json.JSONDecodeError as error:
        raise _json_error(path, error) from error
    if text[pos + 1 :].strip():
        raise _json_error(path, json.JSONDecodeError("Extra data", text, pos + 1))


def read_json(
    path: Path, source: str, mine: Mine, records: str | None = None
) -> Iterator[RawRecord | Rejection]:
    """A JSON array of objects, or an object whose values are objects (the key becomes field `_key`).
    With `records: a.b`, the records are the array/object at that dotted path (lines then unknown)."""
    text = _decode_document(path)
    if records:
        try:
            text = json.dumps(get_path(json.loads(text), records), ensure_ascii=False)
        except json.JSONDecodeError as error:
            raise _json_error(path, error) from error
        except KeyError as error:
            raise FidelError(f"{path}: records path {records!r} not found") from error
    pos, line = 0, 1
    for index, (start, end, key, value) in enumerate(_iter_json_container(text, path)):
        if not mine():
            continue
        line += text.count("\n", pos, start)
        pos = start
        bad = _SURROGATE.search(text, start, end)
        if bad:
            bad_line = None if records else line + text.count("\n", start, bad.start())
            detail = f"record {index} holds bytes that are not UTF-8"
            yield Rejection(source, str(path), bad_line, "invalid_utf8", detail)
        elif not isinstance(value, dict):
            detail = f"record {index} is a JSON {type(value).__name__}, not an object"
            yield Rejection(source, str(path), None if records else line, "not_an_object", detail)
        else:
            fields = dict(value) if key is None else {"_key": key, **value}
            where = None if records else line
            rejected = _invalid_text(source, path, where, fields, text[start:end])
            yield rejected or RawRecord(where, str(index), fields)


def read_squad(
    path: Path, source: str, mine: Mine, parts: list[str] | None = None
) -> Iterator[RawRecord | Rejection]:
    """SQuAD json: contexts (`ctxK`), questions (`qK`) and answers (`aK`) as records with field `text`, `kind`
    and `title`. A `paragraphs` value that is a single object instead of a list is accepted."""
    wanted = set(parts or SQUAD_PARTS)
    text = _decode_document(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise _json_error(path, error) from error
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise FidelError(f"{path}: not SQuAD format (no top-level 'data' list)")
    counts = {"context": 0, "question": 0, "answer": 0}
    prefixes = {"context": "ctx", "question": "q", "answer": "a"}

    def record(kind: str, value: Any, title: Any) -> Iterator[RawRecord | Rejection]:
        key = f"{prefixes[kind]}{counts[kind]}"
        counts[kind] += 1
        if kind not in wanted or not mine():
            return
        fields = {"kind": kind, "text": value, "title": title, "id": key}
        if isinstance(value, str) and _SURROGATE.search(value):
            yield Rejection(source, str(path), None, "invalid_utf8", f"{key} holds bytes that are not UTF-8")
        elif found := lone_surrogate(fields):
            detail = f"{key}: {found}, which UTF-8 cannot encode"
            yield Rejection(source, str(path), None, "invalid_utf8", detail)
        else:
            yield RawRecord(None, key, fields)

    for number, article in enumerate(articles):
        if not isinstance(article, dict):
            raise FidelError(f"{path}: data[{number}] is not an object")
        paragraphs = article.get("paragraphs", [])
        for paragraph in [paragraphs] if isinstance(paragraphs, dict) else paragraphs:
            yield from record("context", paragraph.get("context"), article.get("title"))
            for qa in paragraph.get("qas", []):
                yield from record("question", qa.get("question"), article.get("title"))
                for answer in qa.get("answers", []):
                    yield from record("answer", answer.get("text"), article.get("title"))


# ---------------------------------------------------------------------------------------------- xml


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_xml(path: Path, source: str, mine: Mine, record_tag: str) -> Iterator[RawRecord | Rejection]:
    """XML, streamed: each `record_tag` element is a record; fields are its attributes, the text of each child
    element (by local tag name, first occurrence) and `_text` (all text inside the element). A file with no
    `record_tag` element is an error naming the elements it has (a wrong tag would read nothing unseen)."""
    parser = ET.XMLPullParser(events=("start", "end"))
    bad_lines: dict[int, bytes] = {}
    others: dict[str, None] = {}  # the first few other element names, in file order
    start_line, index, depth = 0, 0, 0
    try:
        for number, raw in enumerate(iter_raw_lines(path), start=1):
            if decode_line(raw) is None:
                bad_lines[number] = raw
                raw = raw.decode("utf-8", errors="replace").encode("utf-8")
            parser.feed(raw + b"\n")
            for event, element in parser.read_events():
                if _local(element.tag) != record_tag:
                    if len(others) < 8:
                        others.setdefault(_local(element.tag))
                    continue
                if event == "start":
                    depth += 1
                    if depth == 1:
                        start_line = number
                    continue
                depth -= 1
                if depth:
                    continue
                key, index = str(index), index + 1
                if mine():
                    bad = next((n for n in range(start_line, number + 1) if n in bad_lines), None)
                    if bad is not None:
                        yield bad_utf8(source, path, bad, bad_lines[bad])
                    else:
                        fields: dict[str, Any] = {_local(k): v for k, v in element.attrib.items()}
                        for child in element.iter():
                            if child is not element:
                                fields.setdefault(_local(child.tag), "".join(child.itertext()))
                        fields["_text"] = "".join(element.itertext())
                        yield RawRecord(start_line, key, fields)
                element.clear()
        parser.close()
    except ET.ParseError as error:
        line, column = error.position
        raise FidelError(f"{path}:{line}: malformed XML, column {column} ({error})") from error
    if not index:
        raise FidelError(
            f"{path}: no <{record_tag}> element, the record_tag of source {source!r}; elements in the file:"
            f" {', '.join(f'<{name}>' for name in others) or 'none'}"
        )


# ---------------------------------------------------------------------------------------------- dispatch


def get_path(value: Any, dotted: str) -> Any:
    """`a.b.0.c` lookup through dicts and lists; KeyError when any step is missing."""
    for step in dotted.split("."):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            raise KeyError(step)
    return value


def read_records(
    path: Path,
    fmt: str,
    source: str,
    mine: Mine,
    options: dict[str, Any] | None = None,
    unit: str = "line",
    required: list[str] | None = None,
    optional: list[str] | None = None,
) -> Iterator[RawRecord | Rejection]:
    """Dispatch to the reader for `fmt`. `required` lists columns that csv/tsv/parquet headers must have;
    `optional` ones are read too where present (parquet reads only the columns it is told)."""
    options = options or {}
    required = required or []
    if fmt == "jsonl":
        return read_jsonl(path, source, mine)
    if fmt == "json":
        return read_json(path, source, mine, options.get("records"))
    if fmt == "txt":
        return read_txt(path, source, mine, unit)
    if fmt in ("csv", "tsv"):
        return read_delimited(path, source, mine, options, fmt, required)
    if fmt == "parquet":
        return read_parquet(path, source, mine, required, int(options.get("batch_size", 4096)), optional)
    if fmt == "xml":
        if "record_tag" not in options:
            raise FidelError(f"{path}: xml sources need options.record_tag (the element holding one record)")
        return read_xml(path, source, mine, options["record_tag"])
    if fmt == "conll":
        return read_conll(path, source, mine, int(options.get("column", 0)))
    if fmt == "squad":
        return read_squad(path, source, mine, options.get("parts"))
    raise FidelError(f"{path}: unknown format {fmt!r}; {supported_formats_message()}")
