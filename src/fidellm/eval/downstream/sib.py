"""Topic (SIB-200) and sentiment (AfriSenti) classification by label likelihood, zero- and k-shot.

Each test item is scored with every label: log P(" " + label word | prompt) under the model
(`likelihood.score_choices`); the prediction is the argmax of the raw log-likelihood (`acc`, lm-eval's
name) and of the log-likelihood per character of the label word (`acc_norm`).

The task definitions are the lm-eval task YAMLs shipped in `fidellm/eval/lmeval_tasks/`: doc_to_text (a
Jinja template), doc_to_choice, target_delimiter and fewshot_delimiter are read from there and rendered as
lm-eval renders them, so our scorer and `lm_eval --model hf` (see lmeval.py) build the same prompts.

Choices made here (reported in every result's details):
- Label words are Amharic (e.g. sports → ስፖርት): the models are trained on Amharic text and have seen
  little English, so an English label would mostly measure how the model spells English.
- Prompt: "<text>\\nርዕሰ ጉዳይ:" ("subject:") for SIB-200, "<tweet>\\nስሜት:" ("feeling:") for AfriSenti.
- k-shot: demonstrations are "<prompt> <label word>\\n\\n" before the query. One `random.Random(seed)`
  draws k training examples without replacement for each test item in file order: the same draws as
  lm-eval's default sampler with `fewshot_random_seed=seed`, so `--num_fewshot k` builds the same prompts.
- Context fit: when a prompt and its longest label do not fit the model's context, whole demonstrations
  are dropped from the left (the earliest first) until they do; the query is never cut (a query that does
  not fit alone is an error). lm-eval instead cuts tokens from the left, so the two differ only there.
- `limit` takes the first N items of the split, as lm-eval's `--limit` does.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import yaml
from torch import nn

from fidellm.data.readers import Rejection, read_records
from fidellm.data.registry import SourceSpec, load_registry
from fidellm.data.sources import resolve_files
from fidellm.errors import FidelError
from fidellm.eval.downstream.likelihood import encode_pairs, model_context, score_choices
from fidellm.eval.downstream.metrics import accuracy, macro_f1
from fidellm.eval.downstream.tasks import TextExample, load_afrisenti
from fidellm.eval.results import TaskResult
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import TextTokenizer

TASKS_DIR = resources.files("fidellm.eval") / "lmeval_tasks"  # the packaged task YAMLs
SIB_TASK = "fidel_sib200_amh"
AFRISENTI_TASK = "fidel_afrisenti_amh"
TASK_NAMES = (SIB_TASK, AFRISENTI_TASK)
DEFAULT_SEED = 1234  # lm-eval's default fewshot_random_seed
SIB_COLUMNS = ["index_id", "category", "text"]

# lm-eval's Jinja environment (lm_eval.utils.env): undefined fields are errors, a trailing newline is kept.
_JINJA = jinja2.Environment(
    loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
)


class FunctionRef(str):
    """A `!function module.name` value of an lm-eval YAML, kept as written so the file can be written back."""


class TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML loading that keeps lm-eval's `!function` tags as `FunctionRef`s."""


TaskYamlLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))


@dataclass(frozen=True)
class ChoiceTask:
    """One multiple-choice task as its lm-eval YAML defines it; `labels[i]` is the dataset label that
    `choices[i]` (the label word the model scores) stands for."""

    name: str
    template: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    target_delimiter: str
    fewshot_delimiter: str
    data_files: dict[str, str]
    config: dict[str, Any] = field(hash=False, compare=False)

    def record(self, example: TextExample) -> dict[str, Any]:
        """The lm-eval document of one example (a line of the JSONL files): text, label and choice index."""
        return {"text": example.text, "label": example.label, "gold": self.labels.index(example.label)}

    def prompt(self, example: TextExample) -> str:
        """doc_to_text of the example, rendered as lm-eval renders it."""
        return _JINJA.from_string(self.template).render(**self.record(example))

    def demonstration(self, example: TextExample) -> str:
        """The example as a solved demonstration: prompt, target delimiter, label word, fewshot delimiter."""
        answer = self.choices[self.labels.index(example.label)]
        return self.prompt(example) + self.target_delimiter + answer + self.fewshot_delimiter


def load_choice_task(name: str) -> ChoiceTask:
    """The packaged task `name` (a YAML in TASKS_DIR); a field missing or of the wrong shape is an error."""
    source = TASKS_DIR / f"{name}.yaml"
    if not source.is_file():
        raise FidelError(f"no lm-eval task {name!r}; known: {', '.join(TASK_NAMES)}")
    config = yaml.load(source.read_text(encoding="utf-8"), Loader=TaskYamlLoader)  # a SafeLoader

    def need(value: Any, kind: type, what: str) -> Any:
        if not isinstance(value, kind):
            raise FidelError(f"{source}: field {what!r} must be a {kind.__name__}, got {value!r}")
        return value

    choices = tuple(need(config.get("doc_to_choice"), list, "doc_to_choice"))
    metadata = need(config.get("metadata"), dict, "metadata")
    labels = tuple(need(metadata.get("labels"), list, "metadata.labels"))
    if len(labels) != len(choices):
        raise FidelError(f"{source}: metadata.labels has {len(labels)} entries, doc_to_choice {len(choices)}")
    dataset_kwargs = need(config.get("dataset_kwargs"), dict, "dataset_kwargs")
    files = need(dataset_kwargs.get("data_files"), dict, "dataset_kwargs.data_files")
    return ChoiceTask(
        name=name,
        template=need(config.get("doc_to_text"), str, "doc_to_text"),
        choices=choices,
        labels=labels,
        target_delimiter=config.get("target_delimiter", " "),
        fewshot_delimiter=config.get("fewshot_delimiter", "\n\n"),
        data_files={str(split): str(filename) for split, filename in files.items()},
        config=config,
    )


# ---------------------------------------------------------------------------------------------- data


def load_sib200(
    data_dir: str | Path | None = None, registry: dict[str, SourceSpec] | None = None
) -> dict[str, list[TextExample]]:
    """SIB-200 Amharic (registry source `sib200`): split -> examples in file order. A malformed row or an
    unknown category is a `FidelError` naming file:line (evaluation data must be intact)."""
    registry = registry if registry is not None else load_registry()
    labels = load_choice_task(SIB_TASK).labels
    splits: dict[str, list[TextExample]] = {}
    for resolved in resolve_files(registry["sib200"], resolve_data_dir(data_dir)):
        examples = splits.setdefault(resolved.split, [])
        for item in read_records(resolved.path, "tsv", "sib200", lambda: True, required=SIB_COLUMNS):
            if isinstance(item, Rejection):
                raise FidelError(f"evaluation set {item}")
            where = f"{resolved.path}:{item.line}"
            category, text = item.fields["category"].strip(), item.fields["text"]
            if category not in labels:
                raise FidelError(f"{where}: field 'category': {category!r} is not one of {', '.join(labels)}")
            if not text.strip():
                raise FidelError(f"{where}: field 'text' is empty")
            examples.append(TextExample(text, category, where))
    return splits


def task_splits(name: str, data_dir: str | Path | None = None) -> dict[str, list[TextExample]]:
    """Split -> examples of one of TASK_NAMES, read from the data directory through the registry."""
    if name == SIB_TASK:
        return load_sib200(data_dir)
    if name == AFRISENTI_TASK:
        data = load_afrisenti(data_dir)
        if set(data.labels) != set(load_choice_task(name).labels):
            raise FidelError(f"AfriSenti labels {data.labels} differ from the task's {name}.yaml")
        return {"train": data.train, "dev": data.dev, "test": data.test}
    raise FidelError(f"no lm-eval task {name!r}; known: {', '.join(TASK_NAMES)}")


# ---------------------------------------------------------------------------------------------- prompts


def build_prompts(
    task: ChoiceTask,
    tokenizer: TextTokenizer,
    items: list[TextExample],
    train: list[TextExample],
    shots: int,
    seed: int,
    max_length: int,
) -> tuple[list[str], list[int]]:
    """(prompt, demonstrations kept) of every item: `shots` seeded demonstrations, dropped from the left
    while the prompt and its longest label overflow `max_length` (module docstring)."""
    if shots < 0:
        raise FidelError(f"shots must be 0 or more, got {shots}")
    if shots > len(train):
        raise FidelError(f"{shots} shots asked, but the training split has {len(train)} examples")
    rng = random.Random(seed)
    demos = [[task.demonstration(example) for example in rng.sample(train, shots)] for _ in items]
    queries = [task.prompt(item) for item in items]
    prompts, kept = [""] * len(items), [shots] * len(items)
    pending = list(range(len(items)))
    while pending:  # every item with all its demonstrations, then those that overflow with one fewer
        for i in pending:
            prompts[i] = "".join(demos[i][shots - kept[i] :]) + queries[i]
        needed = _tokens_needed(task, tokenizer, [prompts[i] for i in pending])
        overflowing = [(i, n) for i, n in zip(pending, needed, strict=True) if n > max_length]
        for i, n in overflowing:
            if kept[i] == 0:
                raise FidelError(
                    f"{items[i].where}: the prompt needs {n} tokens without demonstrations, more than the "
                    f"model's context of {max_length} (the query is never truncated)"
                )
            kept[i] -= 1
        pending = [i for i, _ in overflowing]
    return prompts, kept


def _tokens_needed(task: ChoiceTask, tokenizer: TextTokenizer, prompts: list[str]) -> list[int]:
    """Per prompt, the model positions its longest label needs (context + continuation ids - 1); all
    prompts and labels in one batched `encode_pairs`."""
    labels = [task.target_delimiter + choice for choice in task.choices]
    pairs = encode_pairs(tokenizer, [p for p in prompts for _ in labels], labels * len(prompts))
    lengths = [len(context) + len(continuation) - 1 for context, continuation in pairs]
    return [max(lengths[k * len(labels) : (k + 1) * len(labels)]) for k in range(len(prompts))]


# ---------------------------------------------------------------------------------------------- evaluation


def _per_label(
    labels: tuple[str, ...], gold: list[str], raw: list[str], norm: list[str]
) -> dict[str, dict[str, int]]:
    """Per dataset label: gold count, times predicted, correct predictions (raw and length-normalised)."""
    predicted, predicted_norm = Counter(raw), Counter(norm)
    return {
        label: {
            "gold": gold.count(label),
            "predicted": predicted[label],
            "correct": sum(g == p == label for g, p in zip(gold, raw, strict=True)),
            "predicted_norm": predicted_norm[label],
            "correct_norm": sum(g == p == label for g, p in zip(gold, norm, strict=True)),
        }
        for label in labels
    }


def evaluate_choice_task(
    name: str,
    model: nn.Module,
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    shots: int = 0,
    seed: int = DEFAULT_SEED,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
) -> TaskResult:
    """Accuracy of label-likelihood classification on `split` of the task `name` (one of TASK_NAMES), with
    acc_norm, macro-F1 and per-label counts in details; demonstrations come from the train split."""
    started = time.perf_counter()
    task = load_choice_task(name)
    splits = task_splits(name, data_dir)
    if split not in splits:
        raise FidelError(f"{name} has no split {split!r}; splits: {', '.join(splits)}")
    if limit is not None and limit < 1:
        raise FidelError(f"limit must be a positive number of items, got {limit}")
    items = splits[split][:limit]
    max_length = model_context(model)
    prompts, kept = build_prompts(task, tokenizer, items, splits["train"], shots, seed, max_length)
    scores = score_choices(model, tokenizer, prompts, task.choices, task.target_delimiter, batch_size)
    gold = [item.label for item in items]
    raw = [task.labels[i] for i in scores.raw]
    norm = [task.labels[i] for i in scores.norm]
    f1, per_class_f1 = macro_f1(gold, raw)
    f1_norm, _ = macro_f1(gold, norm)
    details = {
        "method": "label likelihood",
        "lm_eval_task": name,
        "template": task.template,
        "target_delimiter": task.target_delimiter,
        "label_words": dict(zip(task.labels, task.choices, strict=True)),
        "shots": shots,
        "seed": seed,
        "shots_kept_mean": sum(kept) / len(kept),
        "items_with_fewer_shots": sum(k < shots for k in kept),
        "max_length": max_length,
        "limit": limit,
        "acc": accuracy(gold, raw),
        "acc_norm": accuracy(gold, norm),
        "macro_f1": f1,
        "macro_f1_norm": f1_norm,
        "per_class_f1": per_class_f1,
        "per_label": _per_label(task.labels, gold, raw, norm),
    }
    return TaskResult(
        task=f"{name.removeprefix('fidel_')}_{shots}shot",
        metric="accuracy",
        value=details["acc"],
        n=len(items),
        split=split,
        details=details,
        seconds=round(time.perf_counter() - started, 3),
    )


def evaluate_sib(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    shots: int = 0,
    seed: int = DEFAULT_SEED,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
) -> TaskResult:
    """SIB-200 Amharic topic accuracy by label likelihood (7 labels; test 204 items), zero- or k-shot."""
    return evaluate_choice_task(SIB_TASK, model, tokenizer, data_dir, shots, seed, split, limit, batch_size)


def evaluate_afrisenti_likelihood(
    model: nn.Module,
    tokenizer: TextTokenizer,
    data_dir: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 8,
) -> TaskResult:
    """AfriSenti Amharic sentiment macro-F1 by zero-shot label likelihood (3 labels; test 1,999 tweets),
    the task's headline metric; accuracy and acc_norm are in details."""
    result = evaluate_choice_task(
        AFRISENTI_TASK, model, tokenizer, data_dir, 0, DEFAULT_SEED, split, limit, batch_size
    )
    result.metric, result.value = "macro_f1", result.details["macro_f1"]
    return result
