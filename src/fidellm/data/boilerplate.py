"""Boilerplate lines and exact duplicates: a counting pass over the corpus, then a removal pass.

Boilerplate is found by frequency, not by hand-written patterns: a short line whose *shape* (its match
key with every digit run masked) occurs in at least `min_docs` different documents is boilerplate. That
catches the ENH forum-link line, the "ከ<paper> <month> <day> ቀን <year>" source/date footers (one shape per
paper and month), and repeated chapter/page markers of the ebooks. Lines with no letter at all (page
numbers, "***", rules) are dropped as `non_text` lines. Both counts are reported.

The counting pass also records one exact-duplicate key per document (the hash of its match key), so the
removal pass keeps exactly one document per key — the one with the smallest id, whichever rank reads it
(copies that share the id too, such as a line repeated verbatim in a JSONL file: the first copy read by the
lowest rank holding one).
"""

from __future__ import annotations

import contextlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.disk_base import DiskWriter

from fidellm.data.amharic import match_key
from fidellm.data.config import RERUN_PREPARE, BoilerplateConfig
from fidellm.hashing import stable_hash64
from fidellm.jsonfile import read_json

_DIGIT_RUN = re.compile(r"[0-9\u1369-\u137C]+")


def line_shape(line: str) -> str:
    """The key under which repeated lines are counted: match key with digit runs masked as '0'."""
    return _DIGIT_RUN.sub("0", match_key(line))


def has_letter(line: str) -> bool:
    return any(unicodedata.category(ch).startswith("L") for ch in line)


def _doc_shapes(text: str, max_line_chars: int) -> set[int]:
    shapes = set()
    for line in text.split("\n"):
        if len(line) <= max_line_chars and has_letter(line):
            shape = line_shape(line)
            if shape:
                shapes.add(stable_hash64(shape))
    return shapes


def one_copy(text: str) -> tuple[str, int]:
    """`text` once when its non-blank lines are one block said k >= 2 times over (a wiki page stored
    twice, a proverb page whose line repeats), with the number of non-blank lines removed; else
    (`text`, 0).

    Only whole copies collapse: a refrain or a repeated verse inside other text stays (the quality
    score's duplicate-line component judges those)."""
    lines = text.split("\n")
    content = [i for i, line in enumerate(lines) if line.strip()]
    n = len(content)
    for period in range(1, n // 2 + 1):
        if n % period or lines[content[period]] != lines[content[0]]:
            continue
        if all(lines[content[i]] == lines[content[i - period]] for i in range(period, n)):
            return "\n".join(lines[: content[period - 1] + 1]), n - period
    return text, 0


class CollapseCopies(PipelineStep):
    """Keeps one copy of a document that repeats itself whole (`one_copy`); every other document passes
    unchanged. Metadata `copy_lines_removed`; stats `collapsed_docs`, `copy_lines_removed`. Runs after
    the boilerplate lines are gone: the 2015 Wikipedia's proverb pages are the proverb line twice and
    "ትርጉሙ" ("its meaning"), a boilerplate line, and the quality score dropped them whole."""

    name = "🔁 whole-copy repeats"
    type = "✂️ - FORMAT"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                text, removed = one_copy(doc.text)
                if removed:
                    doc.text = text
                    doc.metadata["copy_lines_removed"] = removed
                    self.stat_update("collapsed_docs")
                    self.stat_update("copy_lines_removed", value=removed)
            yield doc


class CorpusCounter(PipelineStep):
    """Counting pass: per rank, document frequency of line shapes and the exact-duplicate key of each doc."""

    name = "🔢 line & duplicate counts"
    type = "📊 - STATS"

    def __init__(self, output_folder: str | Path, config: BoilerplateConfig):
        super().__init__()
        self.output_folder = str(output_folder)
        self.config = config

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        shape_df: Counter[int] = Counter()
        keys: list[int] = []
        ids: list[str] = []
        for doc in data:
            with self.track_time():
                self.stat_update("documents")
                if self.config.enabled:
                    shape_df.update(_doc_shapes(doc.text, self.config.max_line_chars))
                keys.append(stable_hash64(match_key(doc.text)))
                ids.append(doc.id)
        out = Path(self.output_folder)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(
            out / f"{rank:05d}.npz",
            rank=np.int64(rank),
            shape_hash=np.fromiter(shape_df.keys(), dtype=np.uint64, count=len(shape_df)),
            shape_df=np.fromiter(shape_df.values(), dtype=np.int64, count=len(shape_df)),
            doc_key=np.asarray(keys, dtype=np.uint64),
            doc_id=np.asarray(ids, dtype=str),
        )
        return
        yield  # a generator that consumes its input and forwards nothing


def _load_counts(folder: str) -> tuple[Counter[int], dict[int, tuple[str, int]]]:
    """Merge every rank's counts: shape hash -> document frequency, doc key -> (id, rank) of the doc to
    keep: the smallest id, and of copies sharing that id the one on the lowest rank."""
    shape_df: Counter[int] = Counter()
    keeper: dict[int, tuple[str, int]] = {}
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as part:
            rank = int(part["rank"])
            for shape, count in zip(part["shape_hash"].tolist(), part["shape_df"].tolist(), strict=True):
                shape_df[shape] += count
            for key, doc_id in zip(part["doc_key"].tolist(), part["doc_id"].tolist(), strict=True):
                if key not in keeper or (doc_id, rank) < keeper[key]:
                    keeper[key] = (doc_id, rank)
    return shape_df, keeper


class ExactDedup(PipelineStep):
    """Drops every document whose match key equals that of the document kept for it (`_load_counts`): one
    with a smaller id, or an earlier copy with the same id."""

    name = "🫂 exact dedup"
    type = "🫂 - DEDUP"

    def __init__(self, counts_folder: str | Path, exclusion_writer: DiskWriter | None = None):
        super().__init__()
        self.counts_folder = str(counts_folder)
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _, keeper = _load_counts(self.counts_folder)
        kept: set[int] = set()
        with self.exclusion_writer or contextlib.nullcontext() as writer:
            for doc in data:
                with self.track_time():
                    key = stable_hash64(match_key(doc.text))
                    keep = keeper.get(key, (doc.id, rank))
                    if key in kept or keep != (doc.id, rank):
                        self.stat_update("dropped_exact_duplicate")
                        doc.metadata["filter_reason"] = "exact_duplicate"
                        doc.metadata["duplicate_of"] = keep[0]
                        if writer is not None:
                            writer.write(doc, rank)
                        continue
                    kept.add(key)
                    self.stat_update("forwarded")
                yield doc


class BoilerplateRemover(PipelineStep):
    """Removes boilerplate and non-text lines; records what it removed per document and overall. A document
    with nothing else left is dropped as `boilerplate_only` (a filter downstream would give it a wrong
    reason, e.g. "low Ethiopic share" for an empty text)."""

    name = "🧹 boilerplate lines"
    type = "✂️ - FORMAT"

    def __init__(
        self,
        counts_folder: str | Path,
        examples_folder: str | Path,
        config: BoilerplateConfig,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__()
        self.counts_folder = str(counts_folder)
        self.examples_folder = str(examples_folder)
        self.config = config
        self.exclusion_writer = exclusion_writer

    def _clean(self, text: str, boiler: set[int], examples: Counter[str]) -> tuple[str, int, int]:
        kept: list[str] = []
        n_boiler = n_non_text = 0
        lines = text.split("\n")
        for line in lines:
            if self.config.drop_non_text_lines and not has_letter(line):
                n_non_text += 1
                examples[f"non_text\t{line[:80]}"] += 1
                continue
            if len(lines) > 1 and len(line) <= self.config.max_line_chars:
                shape = line_shape(line)
                if shape and stable_hash64(shape) in boiler:
                    n_boiler += 1
                    examples[f"boilerplate\t{shape[:80]}"] += 1
                    continue
            kept.append(line)
        return "\n".join(kept), n_boiler, n_non_text

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        shape_df, _ = _load_counts(self.counts_folder)
        boiler = {shape for shape, df in shape_df.items() if df >= self.config.min_docs}
        examples: Counter[str] = Counter()
        with self.exclusion_writer or contextlib.nullcontext() as writer:
            for doc in data:
                with self.track_time():
                    text, n_boiler, n_non_text = self._clean(doc.text, boiler, examples)
                    if n_boiler or n_non_text:
                        doc.metadata["boilerplate_lines"] = n_boiler
                        doc.metadata["non_text_lines"] = n_non_text
                        self.stat_update("boilerplate_lines", value=n_boiler)
                        self.stat_update("non_text_lines", value=n_non_text)
                if not text.strip():
                    self.stat_update("dropped_boilerplate_only")
                    doc.metadata["filter_reason"] = "boilerplate_only"
                    if writer is not None:
                        writer.write(doc, rank)  # with its text: the lines that were removed
                    continue
                doc.text = text
                yield doc
        out = Path(self.examples_folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{rank:05d}.json").write_text(json.dumps(examples.most_common(200), ensure_ascii=False))


def merge_examples(folder: str | Path, top: int = 25) -> list[tuple[str, str, int]]:
    """(kind, line shape, removed count) of the most frequently removed lines over all ranks."""
    total: Counter[str] = Counter()
    for path in sorted(Path(folder).glob("*.json")):
        total.update(dict(read_json(path, RERUN_PREPARE)))
    return [(*key.split("\t", 1), count) for key, count in total.most_common(top)]
