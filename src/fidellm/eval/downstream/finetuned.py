"""The fine-tuned-head downstream tasks as `TaskResult`s: MasakhaNEWS and AfriSenti (macro-F1 on test) and
MasakhaNER (entity F1 with seqeval), each with a linear probe or a full fine-tune (heads.py says how).

`limit` caps every split at a seeded random sample, for quick CPU runs and tests; a limited figure is not
comparable with published ones, and its details carry the limit.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fidellm.eval.downstream.heads import (
    HeadSettings,
    SequenceClassifier,
    TokenClassifier,
    WordEncoding,
    autocast_for,
    context_length,
    encode_texts,
    encode_words,
    features_of,
    finetune,
    fresh_backbone,
    padded,
    per_example,
    select_probe,
)
from fidellm.eval.downstream.metrics import accuracy, entity_scores, macro_f1
from fidellm.eval.downstream.tasks import (
    TaggedExample,
    TaskData,
    TextExample,
    load_afrisenti,
    load_masakhaner,
    load_masakhanews,
)
from fidellm.eval.results import TaskResult
from fidellm.models.loss import IGNORE_INDEX
from fidellm.tokenizer.base import TextTokenizer


@dataclasses.dataclass
class HeadOutcome:
    """Test predictions (a label per text, or a tag per word per sentence), the dev score of the chosen
    head, and how it was trained and chosen."""

    predictions: list[Any]
    dev_score: float
    info: dict[str, Any]


def _splits(data: TaskData) -> dict[str, list]:
    return {"train": data.train, "dev": data.dev, "test": data.test}


def _mean(hidden: Tensor, _index: int) -> Tensor:
    return hidden.mean(0)


# ------------------------------------------------------------------------------------------ classification


def train_classifier(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data: TaskData[TextExample],
    mode: str = "probe",
    settings: HeadSettings | None = None,
) -> HeadOutcome:
    """Fit a sequence-classification head on `data.train`, choose it on dev by macro-F1, predict test."""
    settings = settings or HeadSettings()
    settings.check(mode)
    length = context_length(model, settings)
    seqs, truncated = {}, {}
    for name, split in _splits(data).items():
        seqs[name], truncated[name] = encode_texts(tokenizer, [e.text for e in split], length)
    index = {label: i for i, label in enumerate(data.labels)}
    y = torch.tensor([index[e.label] for e in data.train])
    dev_gold = [e.label for e in data.dev]

    def dev_macro(pred: Tensor) -> float:
        return macro_f1(dev_gold, [data.labels[i] for i in pred.tolist()])[0]

    info: dict[str, Any] = {"pooling": "mean", "max_length": length, "truncated": truncated}
    if mode == "probe":
        backbone = features_of(model).eval()
        feats = {
            name: torch.stack(per_example(backbone, split, _mean, tokenizer.pad_id, settings.batch_size))
            for name, split in seqs.items()
        }
        probe, chosen = select_probe(
            (feats["train"], y), feats["dev"], len(index), dev_macro, settings.l2_grid
        )
        info.update(chosen)
        with torch.no_grad():
            test_pred = probe(feats["test"]).argmax(-1)
    else:
        device = next(model.parameters()).device
        module = SequenceClassifier(fresh_backbone(model, settings.seed), len(index)).to(device)

        def predict(split: str) -> Tensor:
            rows = per_example(module.backbone, seqs[split], _mean, tokenizer.pad_id, settings.batch_size)
            with torch.no_grad():
                return module.head(torch.stack(rows).to(device)).argmax(-1).cpu()

        def loss_of(batch: list[int]) -> Tensor:
            ids, lengths = padded([seqs["train"][i] for i in batch], tokenizer.pad_id, device)
            with autocast_for(device):
                logits = module(ids, lengths)
            return F.cross_entropy(logits.float(), y[batch].to(device))

        info.update(finetune(module, len(y), loss_of, lambda: dev_macro(predict("dev")), settings))
        test_pred = predict("test")
    return HeadOutcome([data.labels[i] for i in test_pred.tolist()], info["dev_score"], info)


# ---------------------------------------------------------------------------------------------- tagging


class _Tagged:
    """The encoded sentences of one split and the way back from per-word predictions to tag sequences."""

    def __init__(self, encodings: list[WordEncoding]):
        self.encodings = encodings
        self.kept = [[p for p in e.positions if p >= 0] for e in encodings]

    def decode(self, flat: Tensor, labels: tuple[str, ...], outside: int) -> list[list[str]]:
        """Per-sentence word tags from the predictions of the kept words in order; "O" for cut-off words."""
        sentences, at = [], 0
        for encoding in self.encodings:
            tags = []
            for position in encoding.positions:
                tags.append(labels[int(flat[at])] if position >= 0 else labels[outside])
                at += position >= 0
            sentences.append(tags)
        return sentences

    def gather(self, backbone: nn.Module, pad_id: int, batch_size: int, head: Any = None) -> Tensor:
        """The states (or head outputs) at the kept words' positions, all sentences concatenated."""

        def pick(hidden: Tensor, i: int) -> Tensor:
            rows = hidden[self.kept[i]]
            return rows if head is None else head(rows)

        seqs = [e.ids for e in self.encodings]
        return torch.cat(per_example(backbone, seqs, pick, pad_id, batch_size))


def train_tagger(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data: TaskData[TaggedExample],
    mode: str = "probe",
    settings: HeadSettings | None = None,
) -> HeadOutcome:
    """Fit a token-classification head on `data.train`, choose it on dev by entity F1, and predict a tag
    for every word of every test sentence."""
    settings = settings or HeadSettings()
    settings.check(mode)
    length = context_length(model, settings)
    splits = {
        name: _Tagged([encode_words(tokenizer, e.tokens, length, settings.subword) for e in examples])
        for name, examples in _splits(data).items()
    }
    index = {tag: i for i, tag in enumerate(data.labels)}
    outside = index.get("O", 0)
    word_tags = [
        [index[tag] for tag, p in zip(e.tags, w.positions, strict=True) if p >= 0]
        for e, w in zip(data.train, splits["train"].encodings, strict=True)
    ]
    dev_gold = [list(e.tags) for e in data.dev]

    def dev_f1(flat: Tensor) -> float:
        return entity_scores(dev_gold, splits["dev"].decode(flat, data.labels, outside))["f1"]

    info: dict[str, Any] = {
        "subword": settings.subword,
        "max_length": length,
        "truncated": {n: sum(e.truncated for e in s.encodings) for n, s in splits.items()},
        "words_cut_off": {n: sum(p < 0 for e in s.encodings for p in e.positions) for n, s in splits.items()},
    }
    pad, size = tokenizer.pad_id, settings.batch_size
    if mode == "probe":
        backbone = features_of(model).eval()
        feats = {name: split.gather(backbone, pad, size) for name, split in splits.items()}
        y = torch.tensor([tag for tags in word_tags for tag in tags])
        probe, chosen = select_probe((feats["train"], y), feats["dev"], len(index), dev_f1, settings.l2_grid)
        info.update(chosen)
        with torch.no_grad():
            test_flat = probe(feats["test"]).argmax(-1)
    else:
        device = next(model.parameters()).device
        module = TokenClassifier(fresh_backbone(model, settings.seed), len(index)).to(device)
        train = splits["train"]

        def loss_of(batch: list[int]) -> Tensor:
            ids, _ = padded([train.encodings[i].ids for i in batch], pad, device)
            labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(batch):
                labels[row, train.kept[i]] = torch.tensor(word_tags[i], dtype=torch.long)
            with autocast_for(device):
                logits = module(ids)
            return F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten())

        def predict(split: str) -> Tensor:
            return splits[split].gather(module.backbone, pad, size, module.head).argmax(-1)

        info.update(finetune(module, len(word_tags), loss_of, lambda: dev_f1(predict("dev")), settings))
        test_flat = predict("test")
    return HeadOutcome(splits["test"].decode(test_flat, data.labels, outside), info["dev_score"], info)


# ---------------------------------------------------------------------------------------------- tasks


def _details(data: TaskData, mode: str, settings: HeadSettings, outcome: HeadOutcome) -> dict[str, Any]:
    details = {
        "mode": mode,
        "train_examples": len(data.train),
        "dev_examples": len(data.dev),
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        **data.details,
        **outcome.info,
    }
    if mode == "finetune":
        details["epochs"] = settings.epochs
    return details


def _classification(
    data: TaskData[TextExample],
    model: nn.Module,
    tokenizer: TextTokenizer,
    mode: str,
    limit: int | None,
    settings: HeadSettings | None,
    started: float,
) -> TaskResult:
    settings = settings or HeadSettings()
    data = data.limited(limit, settings.seed)
    outcome = train_classifier(model, tokenizer, data, mode, settings)
    gold = [e.label for e in data.test]
    value, per_class = macro_f1(gold, outcome.predictions)
    details = _details(data, mode, settings, outcome)
    details.update(per_class_f1=per_class, accuracy=accuracy(gold, outcome.predictions))
    seconds = round(time.perf_counter() - started, 2)
    return TaskResult(data.name, "macro_f1", value, len(gold), "test", details=details, seconds=seconds)


def evaluate_masakhanews(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    mode: str = "probe",
    limit: int | None = None,
    settings: HeadSettings | None = None,
) -> TaskResult:
    """MasakhaNEWS Amharic macro-F1 on test (minus the articles also in dev or train). The head trains on
    `fewshot50_train` (50 per class: the shared data has no full train split) and is chosen on dev."""
    started = time.perf_counter()
    data = load_masakhanews(data_dir)
    return _classification(data, model, tokenizer, mode, limit, settings, started)


def evaluate_afrisenti(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    mode: str = "probe",
    limit: int | None = None,
    settings: HeadSettings | None = None,
) -> TaskResult:
    """AfriSenti Amharic macro-F1 on test; the head trains on train and is chosen on dev."""
    started = time.perf_counter()
    return _classification(load_afrisenti(data_dir), model, tokenizer, mode, limit, settings, started)


def evaluate_masakhaner(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    mode: str = "probe",
    limit: int | None = None,
    settings: HeadSettings | None = None,
) -> TaskResult:
    """MasakhaNER Amharic entity F1 (seqeval, exact type and span) on test; n counts sentences."""
    started = time.perf_counter()
    settings = settings or HeadSettings()
    data = load_masakhaner(data_dir).limited(limit, settings.seed)
    outcome = train_tagger(model, tokenizer, data, mode, settings)
    scores = entity_scores([list(e.tags) for e in data.test], outcome.predictions)
    details = _details(data, mode, settings, outcome)
    details.update(
        precision=scores["precision"],
        recall=scores["recall"],
        per_type_f1=scores["per_type_f1"],
        test_entities=scores["gold_entities"],
    )
    seconds = round(time.perf_counter() - started, 2)
    return TaskResult(
        "masakhaner", "entity_f1", scores["f1"], len(data.test), "test", details=details, seconds=seconds
    )
