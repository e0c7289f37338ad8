"""Token shards: the prepared splits encoded once into flat token files the trainer memory-maps.

Layout of RUN/tokens/<split>/ (written to `<split>.partial` and renamed when complete):
  tokens.bin       every document's ids back to back, each document starting with BOS
                   (raw little-endian uint16 when the vocabulary has <= 65,536 ids, else uint32)
  offsets.npy      int64, n_docs + 1 entries: document i is tokens[offsets[i]:offsets[i + 1]]
  doc_source.npy   uint16, n_docs entries: index into meta["source_names"] of each document's source
  meta.json        dtype, vocab size, tokenizer fingerprint, counts per source, source files + sha256
  complexity.npy   only with `curriculum`: float32, n_docs entries, each document's 0-100 complexity
                   (`fidellm.train.curriculum.text_complexity`), which `fidellm train --curriculum` reads
In the train split a document of weight w is emitted floor(w) times, plus once more when a hash of
its id falls below frac(w) (weight 0 drops it); val and test are never reweighted. Per source, meta.json
counts the documents read, those dropped (emitted 0 times) and the copies emitted: docs_read - docs_dropped
documents are in the shards, some of them several times.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fidellm.data.split_files import read_split_file, split_files
from fidellm.errors import FidelError
from fidellm.hashing import file_sha256, unit_interval
from fidellm.jsonfile import read_json_object
from fidellm.paths import RunLayout
from fidellm.tokenizer.base import TextTokenizer, load_document_tokenizer
from fidellm.train.curriculum import SCORE_VERSION, text_complexity

SPLITS = ("train", "val", "test")
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
SOURCES_FILE = "doc_source.npy"
COMPLEXITY_FILE = "complexity.npy"
META_FILE = "meta.json"
FORMAT_VERSION = 1
CHUNK_BYTES = 4 << 20


def copies(doc_id: str, weight: float) -> int:
    """How many times a train document of this weight is emitted: floor(w) + [hash(id) < frac(w)]."""
    whole = math.floor(weight)
    return whole + int(unit_interval(f"weight:{doc_id}") < weight - whole)


_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    """Pool initializer: one single-threaded tokenizer per worker process."""
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_document_tokenizer(tokenizer_dir)


@dataclass
class _Chunk:
    """Documents to encode together: their texts, copy counts and source indices."""

    texts: list[str] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    size: int = 0


def _encode_chunk(
    chunk: _Chunk, tokenizer: TextTokenizer | None = None, score: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Encode a chunk with BOS and apply copy counts: (ids of all emitted documents, their lengths, and
    with `score` their complexity scores, else None)."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    assert tokenizer is not None, "worker tokenizer not initialised"
    encoded = tokenizer.encode_batch(chunk.texts, add_bos=True)
    if any(count != 1 for count in chunk.copies):
        encoded = [ids for ids, count in zip(encoded, chunk.copies, strict=True) for _ in range(count)]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    dtype = tokenizer.token_dtype.newbyteorder("<")
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=dtype, count=int(lengths.sum()))
    if not score:
        return flat, lengths, None
    scores = np.repeat(np.array([text_complexity(t) for t in chunk.texts], dtype=np.float32), chunk.copies)
    return flat, lengths, scores


class _SourceStats:
    """Per-source counts (read, dropped, emitted, tokens) and the index of each source name."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def read(self, source: str, size: int) -> int:
        """Count one document read from `source` (`size` UTF-8 bytes); return the source's index."""
        if source not in self.index:
            self.index[source] = len(self.names)
            self.names.append(source)
            self.counts[source] = {
                "docs_read": 0,
                "bytes_read": 0,
                "docs_dropped": 0,
                "docs_emitted": 0,
                "tokens": 0,
            }
        self.counts[source]["docs_read"] += 1
        self.counts[source]["bytes_read"] += size
        return self.index[source]


def _chunks(
    files: list[Path], reweight: bool, stats: _SourceStats, source_weights: Mapping[str, float]
) -> Iterator[_Chunk]:
    """Documents in file order, grouped into chunks of about CHUNK_BYTES; dropped copies never leave here.

    With `reweight`, a document's weight is `source_weights[source]` when given, else its metadata's.
    """
    chunk = _Chunk()
    for path in files:
        for doc in read_split_file(path):
            size = len(doc.text.encode("utf-8"))
            source = stats.read(doc.source, size)
            count = copies(doc.id, source_weights.get(doc.source, doc.weight)) if reweight else 1
            if count == 0:
                stats.counts[doc.source]["docs_dropped"] += 1
                continue
            chunk.texts.append(doc.text)
            chunk.copies.append(count)
            chunk.sources.append(source)
            chunk.size += size
            if chunk.size >= CHUNK_BYTES:
                yield chunk
                chunk = _Chunk()
    if chunk.texts:
        yield chunk


@contextlib.contextmanager
def _worker_pool(tokenizer_dir: Path, workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Spawned worker processes (safe after `tokenizers` has started threads), or None for in-process work."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _init_worker, (str(tokenizer_dir),)) as pool:
        yield pool


def _encoded(
    chunks: Iterator[_Chunk],
    tokenizer: TextTokenizer,
    pool: ProcessPoolExecutor | None,
    window: int,
    score: bool,
) -> Iterator[tuple[_Chunk, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """(chunk, encoded chunk) in input order, with at most `window` chunks in flight in the pool.

    A worker that dies raises BrokenProcessPool here instead of hanging the run.
    """
    if pool is None:
        for chunk in chunks:
            yield chunk, _encode_chunk(chunk, tokenizer, score)
        return
    pending: deque[tuple[_Chunk, Future]] = deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(_encode_chunk, chunk, None, score)))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _tokenize_split(
    run: RunLayout,
    split: str,
    tokenizer: TextTokenizer,
    tokenizer_dir: Path,
    pool: ProcessPoolExecutor | None,
    window: int,
    show_progress: bool,
    source_weights: Mapping[str, float],
    curriculum: bool,
) -> dict[str, Any]:
    """Encode one split into RUN/tokens/<split>/ (via <split>.partial) and return its meta.json content."""
    files = split_files(run.root, split)
    partial = run.tokens / f"{split}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        meta = _write_split(
            run, split, files, tokenizer, tokenizer_dir, pool, window, partial, show_progress, source_weights,
            curriculum,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    out = run.tokens / split
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return meta


def _write_split(
    run: RunLayout,
    split: str,
    files: list[Path],
    tokenizer: TextTokenizer,
    tokenizer_dir: Path,
    pool: ProcessPoolExecutor | None,
    window: int,
    partial: Path,
    show_progress: bool,
    source_weights: Mapping[str, float],
    curriculum: bool,
) -> dict[str, Any]:
    """Write the four shard files of one split (five with `curriculum`) into `partial`."""
    stats = _SourceStats()
    reweight = split == "train"
    lengths: list[np.ndarray] = []
    doc_sources: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    with (
        (partial / TOKENS_FILE).open("wb") as handle,
        tqdm(desc=f"tokenize {split}", unit="doc", disable=not show_progress) as bar,
    ):
        for chunk, (flat, chunk_lengths, chunk_scores) in _encoded(
            _chunks(files, reweight, stats, source_weights), tokenizer, pool, window, curriculum
        ):
            handle.write(flat.tobytes())
            if chunk_scores is not None:
                scores.append(chunk_scores)
            emitted = np.repeat(np.asarray(chunk.sources, dtype=np.int64), chunk.copies)
            lengths.append(chunk_lengths)
            doc_sources.append(emitted)
            docs = np.bincount(emitted, minlength=len(stats.names))
            tokens = np.bincount(emitted, weights=chunk_lengths, minlength=len(stats.names))
            for source in np.flatnonzero(docs):
                entry = stats.counts[stats.names[source]]
                entry["docs_emitted"] += int(docs[source])
                entry["tokens"] += int(tokens[source])
            bar.update(len(chunk.texts))
    if len(stats.names) > 2**16:
        raise FidelError(f"split {split} has {len(stats.names)} sources; at most 65,536 are supported")
    all_lengths = np.concatenate([np.zeros(1, np.int64), *lengths])
    offsets = np.cumsum(all_lengths)
    np.save(partial / OFFSETS_FILE, offsets)
    np.save(partial / SOURCES_FILE, np.concatenate([np.zeros(0, np.int64), *doc_sources]).astype(np.uint16))
    if curriculum:
        np.save(partial / COMPLEXITY_FILE, np.concatenate([np.zeros(0, np.float32), *scores]))
    meta = {
        "format": FORMAT_VERSION,
        "split": split,
        "dtype": tokenizer.token_dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {
            "dir": str(tokenizer_dir),
            "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint(),
        },
        "n_docs": len(offsets) - 1,
        "n_tokens": int(offsets[-1]),
        "n_docs_read": sum(entry["docs_read"] for entry in stats.counts.values()),
        "n_docs_dropped": sum(entry["docs_dropped"] for entry in stats.counts.values()),
        "reweighted": reweight,
        "source_weights": dict(source_weights) if reweight else {},
        "source_names": stats.names,
        "sources": stats.counts,
        "files": [{"path": str(path.relative_to(run.root)), "sha256": file_sha256(path)} for path in files],
    }
    if curriculum:
        meta["complexity"] = {"file": COMPLEXITY_FILE, "score_version": SCORE_VERSION}
    (partial / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _check_weighted_sources(weights: Mapping[str, float], files: list[Path]) -> None:
    """Refuse, before anything is encoded, a source weight for a source the train split does not hold
    (a typo would otherwise weight nothing); one pass over the documents' metadata."""
    present: dict[str, None] = {}
    for path in files:
        for doc in read_split_file(path):
            present.setdefault(doc.source)
    unknown = sorted(set(weights) - set(present))
    if unknown:
        raise FidelError(
            f"source weights name {unknown}, which the train split does not hold;"
            f" its sources are {', '.join(present)}"
        )


def tokenize_splits(
    run_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    workers: int = 2,
    splits: Sequence[str] = SPLITS,
    show_progress: bool = True,
    source_weights: Mapping[str, float] | None = None,
    curriculum: bool = False,
) -> dict[str, dict[str, Any]]:
    """Encode RUN/data/splits/{train,val,test} into token shards under RUN/tokens/ with RUN/tokenizer.

    Each document becomes BOS + its ids (a control token's string in its text is encoded as text).
    Train documents are repeated by their metadata "weight" (floor(w) copies plus one more with
    probability frac(w), decided by a hash of the id); val and test are encoded once each.
    `source_weights` ({source: weight}) replaces the weight of every train document of those sources:
    0 leaves a source out, 3 triples it (how per-source contribution is measured without re-running
    the data stage). Work is spread over `workers` processes in chunks of
    about 4 MB and written in input order, so the output is byte-identical for any number of workers.
    With `curriculum` each split also gets complexity.npy, every document's complexity score (computed
    in the workers), for `fidellm train --curriculum`; without it the output is exactly as before.
    Returns {split: meta} (the content of each RUN/tokens/<split>/meta.json).
    """
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else RunLayout(run_dir).tokenizer
    if not tokenizer_dir.is_dir():
        raise FidelError(
            f"tokenizer directory {tokenizer_dir} does not exist (run `fidellm tokenizer train RUN` first)"
        )
    for split in splits:
        split_files(run_dir, split)
    weights = dict(source_weights or {})
    bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise FidelError(f"source weights must be finite numbers >= 0, got {bad}")
    if weights and "train" in splits:
        _check_weighted_sources(weights, split_files(run_dir, "train"))
    tokenizer = load_document_tokenizer(tokenizer_dir)
    run = RunLayout(run_dir)
    with _worker_pool(tokenizer_dir, workers) as pool:
        return {
            split: _tokenize_split(
                run, split, tokenizer, tokenizer_dir, pool, 2 * workers, show_progress, weights, curriculum
            )
            for split in splits
        }


WHOLE = ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
META_FIELDS = {  # meta.json fields TokenShards relies on: (what each must be, its check)
    "dtype": ("uint16 or uint32", lambda v: v in ("uint16", "uint32")),
    "n_tokens": WHOLE,
    "n_docs": WHOLE,
    "source_names": ("a list of names", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
    "tokenizer": ("an object", lambda v: isinstance(v, dict)),
}


def read_meta(path: Path) -> dict[str, Any]:
    """A split's meta.json, checked for the fields TokenShards relies on: a damaged one names the file and
    the field instead of failing later with a KeyError."""
    rerun = "rerun `fidellm data tokenize RUN`"
    meta = read_json_object(path, rerun)
    for name, (wanted, ok) in META_FIELDS.items():
        if name not in meta and name != "tokenizer":  # without it load_shards reports another tokenizer
            raise FidelError(f"{path}: field {name!r} is missing; {rerun}")
        if name in meta and not ok(meta[name]):
            raise FidelError(f"{path}: field {name!r} must be {wanted}, got {meta[name]!r}; {rerun}")
    return meta


def _load_array(path: Path) -> np.ndarray:
    """A memory-mapped .npy of the shards; a missing or damaged file names itself."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise FidelError(f"{path}: unreadable ({error}); rerun `fidellm data tokenize RUN`") from error


class TokenShards:
    """Memory-mapped token shards of one split: len() documents, document(i), and the full `tokens` array."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FidelError(
                f"{self.directory} holds no token shards (no {META_FILE}; run `fidellm data tokenize RUN`)"
            )
        self.meta: dict[str, Any] = read_meta(meta_path)
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        n_tokens = self.meta["n_tokens"]
        path = self.directory / TOKENS_FILE
        if not path.is_file() or path.stat().st_size != n_tokens * dtype.itemsize:
            raise FidelError(
                f"{path}: expected {n_tokens} tokens of {dtype.name}; file is missing or truncated"
            )
        self.tokens: np.ndarray = (
            np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        )
        self.offsets: np.ndarray = _load_array(self.directory / OFFSETS_FILE)
        self.doc_source: np.ndarray = _load_array(self.directory / SOURCES_FILE)
        if len(self.offsets) != self.meta["n_docs"] + 1 or int(self.offsets[-1]) != n_tokens:
            raise FidelError(f"{self.directory / OFFSETS_FILE}: does not match meta.json (n_docs, n_tokens)")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, split: str) -> TokenShards:
        """The shards of RUN/tokens/<split>."""
        return cls(RunLayout(run_dir).tokens / split)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> np.ndarray:
        """Ids of document `index` (BOS first), a view into the memory map."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        index %= len(self)
        return self.tokens[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def complexity(self) -> np.ndarray:
        """Every document's complexity score (float32, one per document), written by
        `fidellm data tokenize --curriculum`."""
        path = self.directory / COMPLEXITY_FILE
        info = self.meta.get("complexity")
        if info is None or not path.is_file():
            raise FidelError(
                f"{self.directory}: no complexity scores ({COMPLEXITY_FILE}); rerun"
                " `fidellm data tokenize RUN --curriculum` to use --curriculum"
            )
        if info.get("score_version") != SCORE_VERSION:
            raise FidelError(
                f"{path}: scores of version {info.get('score_version')}, this fidellm computes version"
                f" {SCORE_VERSION}; rerun `fidellm data tokenize RUN --curriculum`"
            )
        scores = np.load(path)
        if scores.shape != (len(self),):
            raise FidelError(f"{path}: {scores.shape[0]} scores for {len(self)} documents")
        return scores

    def source(self, index: int) -> str:
        """Source name of document `index`."""
        return self.meta["source_names"][int(self.doc_source[index])]
