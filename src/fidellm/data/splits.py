"""Document-level train/val/test splits: a hash of the document id decides, then every source and a small
corpus still get every split.

`split_of` places each document by itself, stable across runs, machines and worker counts: test when the
hash of its id falls in [0, test_fraction), val in the next val_fraction, train above. At 1% each, a source
of a hundred long documents (books) can miss val altogether, and its share of the training text (the
Ge'ez e-books are 40% of the default corpus) would then never be measured. `fill_splits` therefore gives
each source with at least `min_source_docs` documents, and then the corpus as a whole, one document in
each required split (train, and val/test when their fraction is positive) it has none in: from the group's
largest split, the document whose hash lies nearest the empty split's range (so test takes the lowest
hash, val the next) among those of typical length (between the quartiles), so neither one long book
outweighs a split nor a one-line stub stands for a source.
Sources and corpora that already have every split keep exactly the placement `split_of` gives.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import orjson
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from fidellm.data.config import SplitConfig
from fidellm.data.split_files import read_split_file
from fidellm.data.writers import GZIP_LEVEL
from fidellm.hashing import unit_interval

SPLITS = ("train", "val", "test")
FILL_ORDER = ("test", "val", "train")
"""Empty splits are filled in the order of their hash ranges, lowest first."""
FILLED_FILE = "filled.jsonl.gz"


def _hash(doc_id: str, config: SplitConfig) -> float:
    return unit_interval(f"{config.seed}:{doc_id}")


def split_of(doc_id: str, config: SplitConfig) -> str:
    """train / val / test from a hash of the document id: stable across runs, machines and worker counts."""
    u = _hash(doc_id, config)
    if u < config.test_fraction:
        return "test"
    if u < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def required_splits(config: SplitConfig) -> list[str]:
    """train, plus val and test when their fraction is positive: the splits that must hold a document."""
    fractions = {"train": 1.0, "val": config.val_fraction, "test": config.test_fraction}
    return [split for split in SPLITS if fractions[split] > 0]


class SplitAssigner(PipelineStep):
    name = "🪓 document split"
    type = "🔻 - FILTER"

    def __init__(self, config: SplitConfig):
        super().__init__()
        self.config = config

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            doc.metadata["split"] = split_of(doc.id, self.config)
            self.stat_update(f"split_{doc.metadata['split']}")
            yield doc


@dataclass(eq=False)
class _Placed:
    """A kept document: its id, source, length, the hash that placed it, the file and line holding it, the
    split of that file and the split it is to be in."""

    doc_id: str
    source: str
    chars: int
    u: float
    path: Path
    line: int
    found_in: str
    split: str


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl.gz"))


def _scan(splits_dir: Path, config: SplitConfig) -> list[_Placed]:
    """Every kept document, in file order."""
    return [
        _Placed(doc.id, doc.source, len(doc.text), _hash(doc.id, config), path, doc.line, split, split)
        for split in SPLITS
        for path in _files(splits_dir / split)
        for doc in read_split_file(path)
    ]


def _distance(u: float, split: str, config: SplitConfig) -> float:
    """How far a hash lies from the range `split_of` gives `split` (0 inside it)."""
    low = {"test": 0.0, "val": config.test_fraction, "train": config.test_fraction + config.val_fraction}
    high = {"test": config.test_fraction, "val": low["train"], "train": 1.0}
    return max(low[split] - u, u - high[split], 0.0)


def _fill_group(group: list[_Placed], required: list[str], config: SplitConfig) -> None:
    """Give each required split `group` has no document in one of the group's documents: from the group's
    largest split, the document whose hash lies nearest the empty split's range among those of typical
    length (between the quartiles there), so neither one long book outweighs a split nor a one-line stub
    stands for a source."""
    by_split = {split: [doc for doc in group if doc.split == split] for split in SPLITS}
    for target in (split for split in FILL_ORDER if split in required and not by_split[split]):
        donor = by_split[max(SPLITS, key=lambda split: len(by_split[split]))]
        lengths = sorted(doc.chars for doc in donor)
        low, high = lengths[(len(lengths) - 1) // 4], lengths[3 * (len(lengths) - 1) // 4]
        doc = min(
            (doc for doc in donor if low <= doc.chars <= high),
            key=lambda d: (_distance(d.u, target, config), d.doc_id),
        )
        donor.remove(doc)
        by_split[target].append(doc)
        doc.split = target


def _read_lines(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as handle:
        return handle.readlines()


def _write_lines(path: Path, lines: list[bytes]) -> None:
    """Replace `path` with these JSONL lines (removed when there are none), atomically."""
    if not lines:
        path.unlink()
        return
    partial = path.with_name(path.name + ".partial")
    with gzip.open(partial, "wb", compresslevel=GZIP_LEVEL) as handle:
        handle.writelines(lines)
    os.replace(partial, path)


def _apply_moves(moves: list[_Placed], splits_dir: Path) -> None:
    """Move each document's record (by its line) from its file into its new split's filled file, marked
    `split_filled`; each file is rewritten once and only the moved lines are parsed."""
    by_file: dict[Path, dict[int, str]] = {}
    for doc in moves:
        by_file.setdefault(doc.path, {})[doc.line] = doc.split
    filled: dict[str, list[bytes]] = {}
    for path, targets in sorted(by_file.items()):
        kept = []
        for number, line in enumerate(_read_lines(path), start=1):
            target = targets.get(number)
            if target is None:
                kept.append(line)
                continue
            record = orjson.loads(line)
            record["metadata"] = {**(record.get("metadata") or {}), "split": target, "split_filled": True}
            filled.setdefault(target, []).append(orjson.dumps(record) + b"\n")
        _write_lines(path, kept)
    for target, lines in filled.items():
        destination = splits_dir / target / FILLED_FILE
        destination.parent.mkdir(parents=True, exist_ok=True)
        _write_lines(destination, (_read_lines(destination) if destination.exists() else []) + lines)


def fill_splits(splits_dir: Path, config: SplitConfig) -> list[str]:
    """Give every required split one document of each source with at least `config.min_source_docs`
    documents, then (small corpora) one document at all, by the rule in the module docstring; moved
    documents are marked `split_filled` in their metadata. Returns the required splits left empty: none,
    unless there are fewer documents than required splits, in which case nothing is moved."""
    required = required_splits(config)
    placed = _scan(splits_dir, config)
    if len(placed) < len(required):
        return [split for split in required if not any(doc.split == split for doc in placed)]
    by_source: dict[str, list[_Placed]] = {}
    for doc in placed:
        by_source.setdefault(doc.source, []).append(doc)
    if config.min_source_docs:
        for source in sorted(by_source):
            if len(by_source[source]) >= config.min_source_docs:
                _fill_group(by_source[source], required, config)
    _fill_group(placed, required, config)
    _apply_moves([doc for doc in placed if doc.split != doc.found_in], splits_dir)
    return []
