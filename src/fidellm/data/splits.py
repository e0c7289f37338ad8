"""Document-level train/val/test splits: a hash of the document id decides, and a small corpus still gets
every split.

`split_of` places each document by itself, stable across runs, machines and worker counts: test when the
hash of its id falls in [0, test_fraction), val in the next val_fraction, train above. On a few dozen
documents val or test can come out empty; `fill_empty_splits` then gives each empty split (train, and
val/test when their fraction is positive) one document: from the largest split, the one whose hash lies
nearest the empty split's range (so test takes the lowest hash, val the next). It moves nothing when every
split already has a document, so larger corpora are split exactly as `split_of` says.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from fidellm.data.config import SplitConfig
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


@dataclass(frozen=True)
class _Placed:
    """A kept document: its id, the hash that placed it and the file holding it."""

    doc_id: str
    u: float
    path: Path


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl.gz"))


def _has_documents(directory: Path) -> bool:
    for path in _files(directory):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            if handle.readline():
                return True
    return False


def _scan(splits_dir: Path, config: SplitConfig) -> dict[str, list[_Placed]]:
    placed: dict[str, list[_Placed]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        for path in _files(splits_dir / split):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                for line in handle:
                    doc_id = json.loads(line)["id"]
                    placed[split].append(_Placed(doc_id, _hash(doc_id, config), path))
    return placed


def _distance(u: float, split: str, config: SplitConfig) -> float:
    """How far a hash lies from the range `split_of` gives `split` (0 inside it)."""
    low = {"test": 0.0, "val": config.test_fraction, "train": config.test_fraction + config.val_fraction}
    high = {"test": config.test_fraction, "val": low["train"], "train": 1.0}
    return max(low[split] - u, u - high[split], 0.0)


def _write_lines(path: Path, lines: list[str]) -> None:
    """Replace `path` with these JSONL lines (removed when there are none), atomically."""
    if not lines:
        path.unlink()
        return
    partial = path.with_name(path.name + ".partial")
    with gzip.open(partial, "wt", encoding="utf-8", compresslevel=GZIP_LEVEL) as handle:
        handle.writelines(lines)
    os.replace(partial, path)


def _move(doc: _Placed, target: str, splits_dir: Path) -> _Placed:
    """Move one document's record from its file into `target`'s filled file; returns it as placed now."""
    with gzip.open(doc.path, "rt", encoding="utf-8") as handle:
        lines = handle.readlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line)["id"] == doc.doc_id)
    record = json.loads(lines.pop(index))
    record["metadata"] = {**record.get("metadata", {}), "split": target, "split_filled": True}
    _write_lines(doc.path, lines)
    destination = splits_dir / target / FILLED_FILE
    destination.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(destination, "at", encoding="utf-8", compresslevel=GZIP_LEVEL) as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return _Placed(doc.doc_id, doc.u, destination)


def fill_empty_splits(splits_dir: Path, config: SplitConfig) -> list[str]:
    """Give every empty required split one document (the rule in the module docstring), marked
    `split_filled` in its metadata. Returns the required splits left empty: none, unless there are fewer
    documents than required splits, in which case nothing is moved."""
    required = required_splits(config)
    empty = [split for split in required if not _has_documents(splits_dir / split)]
    if not empty:
        return []
    placed = _scan(splits_dir, config)
    if sum(len(docs) for docs in placed.values()) < len(required):
        return empty
    for target in (split for split in FILL_ORDER if split in empty):
        donor = max(SPLITS, key=lambda split: len(placed[split]))
        doc = min(placed[donor], key=lambda d: (_distance(d.u, target, config), d.doc_id))
        placed[donor].remove(doc)
        placed[target].append(_move(doc, target, splits_dir))
    return []
