"""Byte streams of plain, .zst and .gz files: chunks, whole contents and raw lines, decompressed on the fly.

Corrupt, truncated or empty files raise FidelError naming the file; nothing is decoded here, so callers can
reject undecodable lines one by one instead of losing the file.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from fidellm.errors import FidelError

COMPRESSED_SUFFIXES = (".zst", ".gz")
BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some Windows tools write at the start of a file: not part of its text."""
CHUNK = 1 << 20
ZSTD_INPUT = 1 << 16  # compressed bytes per step: output per step stays ~ratio x 64 KiB (~0.5 MB for text)


def logical_name(path: Path) -> str:
    """The file name without a compression suffix (`x.jsonl.zst` → `x.jsonl`)."""
    name = path.name
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _zstd_chunks(handle: io.BufferedIOBase, path: Path) -> Iterator[bytes]:
    """Stream-decompress every zstd frame; a truncated last frame is an error (zstandard is silent on it).
    zstandard is imported here, for .zst files only: training and scoring import this module too (line
    decoding) on machines without it, such as the GPU device image (tests/test_device_image.py)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    obj = decompressor.decompressobj()
    pending = False
    while True:
        data = handle.read(ZSTD_INPUT)
        if not data:
            break
        while data:
            try:
                out = obj.decompress(data)
            except zstandard.ZstdError as error:
                raise FidelError(f"{path}: corrupt zstd file ({error})") from error
            pending = True
            if out:
                yield out
            if obj.eof:
                data = obj.unused_data
                obj = decompressor.decompressobj()
                pending = False
            else:
                data = b""
    if pending:
        raise FidelError(f"{path}: corrupt zstd file (truncated: the last frame does not end)")


def iter_chunks(path: Path) -> Iterator[bytes]:
    """Yield the uncompressed bytes of `path` in chunks (.zst and .gz decompressed on the fly).

    Raises FidelError if the file is empty or its compressed stream is corrupt or truncated.
    """
    empty = True
    try:
        with open(path, "rb") as handle:
            if path.name.endswith(".zst"):
                chunks: Iterable[bytes] = _zstd_chunks(handle, path)
            elif path.name.endswith(".gz"):
                gz = gzip.GzipFile(fileobj=handle)
                chunks = iter(lambda: gz.read(CHUNK), b"")
            else:
                chunks = iter(lambda: handle.read(CHUNK), b"")
            for chunk in chunks:
                if chunk:
                    empty = False
                    yield chunk
    except FileNotFoundError as error:
        raise FidelError(f"{path} does not exist") from error
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # corrupt zstd: FidelError in _zstd_chunks
        raise FidelError(f"{path}: corrupt gzip file ({error})") from error
    if empty:
        raise FidelError(f"{path} is empty")


def read_bytes(path: Path) -> bytes:
    """The whole uncompressed content (for formats that need the whole file: json, squad)."""
    return b"".join(iter_chunks(path))


def read_text_bytes(path: Path) -> bytes:
    """`read_bytes` without a leading byte-order mark: the bytes of the file's text."""
    return read_bytes(path).removeprefix(BOM)


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream without their line terminator (\\n or \\r\\n)."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part[:-1] if part.endswith(b"\r") else part
    if rest:
        yield rest[:-1] if rest.endswith(b"\r") else rest


def iter_raw_lines(path: Path) -> Iterator[bytes]:
    """Yield the lines of `path` as bytes without their line terminator (\\n or \\r\\n), and without a
    byte-order mark at the start of the file (it would make the first JSON line invalid, or the first csv
    column '\\ufeffid')."""
    lines = _split_lines(iter_chunks(path))
    for first in lines:
        yield first.removeprefix(BOM)
        break
    yield from lines


def decode_line(raw: bytes) -> str | None:
    """Strict UTF-8 decoding of one line; None when the bytes are not UTF-8 (never replaced silently)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
