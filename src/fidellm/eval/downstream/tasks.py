"""Loaders for the fine-tuned-head downstream sets: MasakhaNEWS and AfriSenti (text → label) and MasakhaNER
(words → BIO tags), read through the source registry and the project's readers (plain, .zst or .gz).

Evaluation data must be intact, so a malformed record (bad UTF-8, wrong column count, unknown label, empty
text, a tag that is not BIO) is a `FidelError` naming file:line and the field, never a silent skip.

MasakhaNEWS: the shared data holds no full train split (upstream `train.tsv` is absent), so its training set
is the 50-per-class `fewshot50_train.tsv`. Test articles that also appear in dev (10) or in that training set
(3) are removed from test, and dev articles that are in the training set (3) from dev, so no figure rests
on an article the head was trained or selected on; the counts are recorded in `details`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from fidellm.data.readers import RawRecord, Rejection, read_records
from fidellm.data.registry import SourceSpec, load_registry
from fidellm.data.sources import ResolvedFile, extract_text, locate, resolve_files
from fidellm.errors import FidelError
from fidellm.eval.sampling import limited
from fidellm.paths import resolve_data_dir

SPLITS = ("train", "dev", "test")
AFRISENTI_LABELS = ("negative", "neutral", "positive")
BIO_TAG = re.compile(r"O|[BI]-[A-Za-z]+")


@dataclass(frozen=True)
class TextExample:
    """One text with its class label; `where` is `file:line` of the record (for errors and tracing)."""

    text: str
    label: str
    where: str


@dataclass(frozen=True)
class TaggedExample:
    """One sentence as words with one BIO tag each; `where` is `file:line` of its first word."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    where: str


E = TypeVar("E", TextExample, TaggedExample)


@dataclass
class TaskData(Generic[E]):
    """The three splits of a task, its label (or tag) set in a fixed order, and how the splits were made."""

    name: str
    labels: tuple[str, ...]
    train: list[E]
    dev: list[E]
    test: list[E]
    details: dict[str, Any] = field(default_factory=dict)

    def limited(self, limit: int | None, seed: int = 0) -> TaskData[E]:
        """At most `limit` examples per split: a seeded random sample kept in file order (so a quick run
        still sees every class), or the data itself when `limit` is None."""
        if limit is None:
            return self
        splits = [limited(examples, limit, seed) for examples in (self.train, self.dev, self.test)]
        return TaskData(self.name, self.labels, *splits, details={**self.details, "limit": limit})


# ---------------------------------------------------------------------------------------------- reading


def _records(spec: SourceSpec, resolved: ResolvedFile, required: list[str]) -> list[RawRecord]:
    """Every record of one file; any rejection is an error (evaluation data must be intact)."""
    records = []
    for item in read_records(
        resolved.path, spec.format, spec.name, lambda: True, spec.options, spec.unit, required
    ):
        if isinstance(item, Rejection):
            raise FidelError(f"evaluation set {item}")
        records.append(item)
    return records


def _split_files(spec: SourceSpec, data_dir: Path, splits: dict[str, str]) -> dict[str, ResolvedFile]:
    """Our split name -> the registry file of the source split it reads (e.g. train <- fewshot50_train)."""
    found = {resolved.split: resolved for resolved in resolve_files(spec, data_dir)}
    missing = [source for source in splits.values() if source not in found]
    if missing:
        raise FidelError(f"source {spec.name!r} has no split {', '.join(missing)} in {spec.origin}")
    return {ours: found[source] for ours, source in splits.items()}


def _where(resolved: ResolvedFile, line: int | None) -> str:
    return f"{resolved.path}:{line}"


def _text_examples(
    spec: SourceSpec, resolved: ResolvedFile, label_field: str, labels: tuple[str, ...]
) -> list[TextExample]:
    """Text (the registry's text fields, joined by newlines) and label of every record of one file."""
    examples = []
    for record in _records(spec, resolved, [*spec.text_fields, label_field]):
        where = _where(resolved, record.line)
        text = extract_text(record.fields, spec.text_fields)
        if isinstance(text, tuple):
            raise FidelError(f"{where}: {text[1]}")
        label = record.fields[label_field].strip()
        if label not in labels:
            raise FidelError(f"{where}: field {label_field!r}: {label!r} is not one of {', '.join(labels)}")
        examples.append(TextExample(text, label, where))
    return examples


def _normalised(text: str) -> str:
    """NFC with whitespace runs collapsed: the key two copies of one article share."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _without(examples: list[TextExample], *others: list[TextExample]) -> tuple[list[TextExample], list[int]]:
    """`examples` minus those whose text also occurs in one of `others`; the removed counts, one per other."""
    kept, removed = examples, []
    for other in others:
        texts = {_normalised(example.text) for example in other}
        before = len(kept)
        kept = [example for example in kept if _normalised(example.text) not in texts]
        removed.append(before - len(kept))
    return kept, removed


def _registry_spec(name: str, registry: dict[str, SourceSpec] | None) -> SourceSpec:
    registry = registry if registry is not None else load_registry()
    if name not in registry:
        raise FidelError(f"source {name!r} is not in the registry")
    return registry[name]


# ---------------------------------------------------------------------------------------------- tasks


def load_afrisenti(
    data_dir: str | Path | None = None, registry: dict[str, SourceSpec] | None = None
) -> TaskData[TextExample]:
    """AfriSenti Amharic tweets (source `afrisenti_amh`): train/dev/test, labels negative/neutral/positive."""
    spec = _registry_spec("afrisenti_amh", registry)
    files = _split_files(spec, resolve_data_dir(data_dir), {s: s for s in SPLITS})
    splits = [_text_examples(spec, files[s], "label", AFRISENTI_LABELS) for s in SPLITS]
    return TaskData("afrisenti", AFRISENTI_LABELS, *splits, details={"train_split": "train"})


def _news_labels(spec: SourceSpec, data_dir: Path) -> tuple[str, ...]:
    """The label list of labels.txt (one per line), which lies beside the source's files."""
    (path,) = locate(spec, "masakhanews_amh/labels.txt", data_dir)[:1]
    labels = []
    for record in read_records(path, "txt", spec.name, lambda: True):
        if isinstance(record, Rejection):
            raise FidelError(f"evaluation set {record}")
        if record.fields["text"].strip():
            labels.append(record.fields["text"].strip())
    if not labels:
        raise FidelError(f"{path}: no labels (expected one label per line)")
    return tuple(labels)


def load_masakhanews(
    data_dir: str | Path | None = None, registry: dict[str, SourceSpec] | None = None
) -> TaskData[TextExample]:
    """MasakhaNEWS Amharic (source `masakhanews_amh`), headline + text -> category. Train is the 50-per-class
    `fewshot50_train` (no full train split is in the data); test loses the articles also in dev or train,
    dev those also in train (module docstring)."""
    spec = _registry_spec("masakhanews_amh", registry)
    data_dir = resolve_data_dir(data_dir)
    labels = _news_labels(spec, data_dir)
    files = _split_files(spec, data_dir, {"train": "fewshot50_train", "dev": "dev", "test": "test"})
    train, dev, test = (_text_examples(spec, files[s], "category", labels) for s in SPLITS)
    kept_test, (test_dev, test_train) = _without(test, dev, train)
    kept_dev, (dev_train,) = _without(dev, train)
    details = {
        "train_split": "fewshot50_train (50 per class; no full train split in the data)",
        "test_before_removal": len(test),
        "removed_dev_overlap": test_dev,
        "removed_train_overlap": test_train,
        "dev_before_removal": len(dev),
        "removed_dev_train_overlap": dev_train,
    }
    return TaskData("masakhanews", labels, train, kept_dev, kept_test, details)


def _tagged_examples(spec: SourceSpec, resolved: ResolvedFile) -> list[TaggedExample]:
    """Words and BIO tags of every sentence of one CoNLL file; a tag that is not O/B-X/I-X is an error."""
    examples = []
    for record in _records(spec, resolved, []):
        tokens, tags = record.fields["tokens"], record.fields["tags"]
        for offset, tag in enumerate(tags):
            if not BIO_TAG.fullmatch(tag):
                where = _where(resolved, (record.line or 0) + offset)
                raise FidelError(f"{where}: field 'tag': {tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)")
        examples.append(TaggedExample(tuple(tokens), tuple(tags), _where(resolved, record.line)))
    return examples


def load_masakhaner(
    data_dir: str | Path | None = None, registry: dict[str, SourceSpec] | None = None
) -> TaskData[TaggedExample]:
    """MasakhaNER Amharic (source `masakhaner_amh`), CoNLL BIO; the tag set is "O" then B-/I- of every
    entity type found in any split, sorted."""
    spec = _registry_spec("masakhaner_amh", registry)
    files = _split_files(spec, resolve_data_dir(data_dir), {s: s for s in SPLITS})
    splits = [_tagged_examples(spec, files[s]) for s in SPLITS]
    types = sorted({tag[2:] for examples in splits for ex in examples for tag in ex.tags if tag != "O"})
    tags = ("O", *(f"{prefix}-{kind}" for kind in types for prefix in "BI"))
    return TaskData("masakhaner", tags, *splits, details={"train_split": "train", "entity_types": types})
