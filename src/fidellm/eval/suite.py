"""`fidellm eval`: run the evaluation suite on one model and write OUT/results.json.

Tasks (evaluation.md): "flores" (second-half bits, bits/byte, bits/char), "heldout" (bits/byte and
bits/char of the prepared corpus's test documents; needs the run directory), "baselines" (compressors
on FLORES, alone and primed with training text), "probes" (generation probes), the downstream tasks
registered in `fidellm.eval.downstream` and the chat tasks of `fidellm.eval.chat` (the `chat` group).
results.json holds every TaskResult, the tokenizer's fertility on FLORES, the published anchors, sha256
of the data files read, the command and the provenance (commit, hardware, wall time), so each number
can be traced and rerun.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fidellm.data.split_files import SplitDocument, read_split_file, split_files
from fidellm.errors import FidelError
from fidellm.eval.baselines import PUBLISHED_ANCHORS, compressor_results
from fidellm.eval.lm import score_documents, score_lines
from fidellm.eval.probes import probe_task_results, run_probes
from fidellm.eval.results import RESULTS_FILE, TaskResult, provenance
from fidellm.eval.sampling import limited
from fidellm.export.hf import WEIGHTS_FILE
from fidellm.hashing import file_sha256
from fidellm.paths import RunLayout
from fidellm.tokenizer.base import TextTokenizer, load_document_tokenizer
from fidellm.tokenizer.report import FLORES_FILES, flores_lines, measure, run_normalization


@dataclass
class EvalContext:
    """What every task may use: the model, its tokenizer, where data and the run are, and limits."""

    model: nn.Module
    tokenizer: TextTokenizer
    device: torch.device
    data_dir: Path
    run_dir: Path | None
    limit: int | None = None
    seed: int = 0
    context_chars: int = 4_000_000
    tokenizer_dir: Path | None = None
    chat_dir: Path | None = None
    out_dir: Path | None = None
    files_read: dict[str, str] = dataclasses.field(default_factory=dict)
    _flores: list[str] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        """A limit below 1 would slice texts[:-1] (one document silently dropped) or score nothing."""
        if self.limit is not None and self.limit < 1:
            raise FidelError(f"--limit must be >= 1, got {self.limit}")

    def document_tokenizer(self) -> TextTokenizer:
        """The tokenizer as the token shards encode documents (a control token's string as text,
        `load_document_tokenizer`): held-out documents are scored as the model trained on them. Without
        a tokenizer directory, the context's tokenizer as given."""
        return load_document_tokenizer(self.tokenizer_dir) if self.tokenizer_dir else self.tokenizer

    def has_flores(self) -> bool:
        """Whether the data directory holds the FLORES amh dev and devtest files."""
        return all((self.data_dir / name).is_file() for name in FLORES_FILES)

    def flores(self) -> list[str]:
        """FLORES amh dev + devtest, normalized like the run's training text (read once; sha256 recorded)."""
        if self._flores is None:
            for name in FLORES_FILES:
                path = self.data_dir / name
                if path.is_file():
                    self.files_read[str(path)] = file_sha256(path)
            folds = run_normalization(self.run_dir)
            self._flores = flores_lines(self.data_dir, folds["fold_homophones"], folds["fold_labialized"])
        return self._flores

    def split_documents(self, split: str, max_chars: int | None = None) -> list[SplitDocument]:
        """Documents of RUN/data/splits/<split> in file order (up to `max_chars` characters)."""
        if self.run_dir is None:
            raise FidelError(f"the {split} split needs a run directory (--run RUN)")
        docs, chars = [], 0
        for path in split_files(self.run_dir, split):
            self.files_read.setdefault(str(path), file_sha256(path))
            for doc in read_split_file(path):
                docs.append(doc)
                chars += len(doc.text)
                if max_chars is not None and chars >= max_chars:
                    return docs
        return docs


def _bits(
    task: str, metric: str, value: float, n: int, split: str, details: dict, seconds: float | None = None
):
    """A lower-is-better TaskResult (every bits figure)."""
    return TaskResult(task, metric, value, n, split, higher_is_better=False, details=details, seconds=seconds)


def task_flores(ctx: EvalContext) -> list[TaskResult]:
    lines = ctx.flores()
    started = time.perf_counter()
    scores = score_lines(ctx.model, ctx.tokenizer, lines, ctx.device)
    seconds = time.perf_counter() - started
    details = {"tokens": scores.tokens, "empty_lines": scores.empty_lines, "windowed": scores.windowed_lines}
    return [
        _bits("flores", metric, getattr(scores, metric), scores.lines, "dev+devtest", details, seconds)
        for metric in ("second_half_bits", "bits_per_byte", "bits_per_char")
    ]


def task_heldout(ctx: EvalContext) -> list[TaskResult]:
    docs = limited(ctx.split_documents("test"), ctx.limit, ctx.seed, group=lambda doc: doc.source)
    started = time.perf_counter()
    scores = score_documents(
        ctx.model,
        ctx.document_tokenizer(),
        [d.text for d in docs],
        ctx.device,
        sources=[d.source for d in docs],
    )
    seconds = time.perf_counter() - started
    details = dataclasses.asdict(scores)
    overall = [
        _bits("heldout", metric, getattr(scores, metric), scores.documents, "test", details, seconds)
        for metric in ("bits_per_byte", "bits_per_char")
    ]
    per_source = [  # every source of the test split has a document there (data/splits.py)
        _bits(f"heldout/{source}", "bits_per_byte", entry["bits_per_byte"], int(entry["documents"]), "test",
              {"bytes": entry["bytes"]}, seconds)
        for source, entry in scores.by_source.items()
    ]  # fmt: skip
    return overall + per_source


def task_baselines(ctx: EvalContext) -> list[TaskResult]:
    text = "\n".join(ctx.flores())
    train = ctx.split_documents("train", ctx.context_chars) if ctx.run_dir else []
    context = "\n\n".join(doc.text for doc in train)
    return compressor_results(text, context[: ctx.context_chars])


def task_probes(ctx: EvalContext) -> list[TaskResult]:
    devtest = ctx.flores()[-1012:]  # FLORES devtest: held out from training by decontamination
    return probe_task_results(run_probes(ctx.model, ctx.tokenizer, devtest, ctx.device))


TaskFunction = Callable[[EvalContext], list[TaskResult]]
TASKS: dict[str, TaskFunction] = {
    "flores": task_flores,
    "heldout": task_heldout,
    "baselines": task_baselines,
    "probes": task_probes,
}
"""Task name -> function; downstream tasks add themselves in fidellm.eval.downstream.registry, chat tasks
in fidellm.eval.chat."""


def all_tasks(names: list[str] | None = None) -> dict[str, TaskFunction]:
    """The built-in tasks, the downstream ones and, unless every one of `names` is among those, the chat
    ones: their module (sacrebleu, the SFT data code, the server's tool parser) costs a base model's
    `fidellm eval` about 0.4 s of imports."""
    from fidellm.eval.downstream.registry import DOWNSTREAM_TASKS

    known = {**TASKS, **DOWNSTREAM_TASKS}
    if names is None or any(name not in known for name in names):
        from fidellm.eval.chat import CHAT_TASKS

        known.update(CHAT_TASKS)
    return known


def expand_groups(tasks: list[str]) -> list[str]:
    """`tasks` with each group name (e.g. "chat") replaced by its tasks, each task once, in order."""
    known = all_tasks(tasks)
    if all(name in known for name in tasks):  # no group named: the chat module may stay unloaded
        return list(dict.fromkeys(tasks))
    from fidellm.eval.chat import TASK_GROUPS

    return list(dict.fromkeys(name for task in tasks for name in TASK_GROUPS.get(task, (task,))))


def run_suite(
    ctx: EvalContext, tasks: list[str], model_path: Path, out_dir: Path, echo: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Run `tasks` (groups expanded) in order, write OUT/results.json after each (a crash keeps what
    finished); return it. Tasks that save files (the chat generations) write them under OUT."""
    tasks = expand_groups(tasks)
    known = all_tasks(tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        from fidellm.eval.chat import TASK_GROUPS

        names = ", ".join([*known, *(f"{group} (group)" for group in TASK_GROUPS)])
        raise FidelError(f"unknown eval task(s) {', '.join(unknown)}; known: {names}")
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx.out_dir = out_dir
    measured = "flores" in tasks or ctx.has_flores()  # else tasks on other data run without FLORES
    fertility = measure("model tokenizer", ctx.tokenizer, ctx.flores()).to_dict() if measured else None
    report: dict[str, Any] = {
        "model": str(model_path),
        "run": None if ctx.run_dir is None else str(ctx.run_dir.resolve()),  # read by `fidellm report`
        "parameters": sum(p.numel() for p in {id(p): p for p in ctx.model.parameters()}.values()),
        "tokenizer": {
            "kind": ctx.tokenizer.kind,
            "vocab_size": ctx.tokenizer.vocab_size,
            "flores": fertility,
        },
        "tasks": tasks,
        "results": [],
        "anchors": [dataclasses.asdict(a) for a in PUBLISHED_ANCHORS],
        "command": sys.argv,
        "limit": ctx.limit,
    }
    for name in tasks:
        task_started = time.perf_counter()
        results = known[name](ctx)
        for result in results:
            result.seconds = result.seconds or round(time.perf_counter() - task_started, 2)
            echo(
                f"{result.task:36s} {result.metric:20s} {result.split:12s} {result.value:10.4f} n={result.n}"
            )
        report["results"] += [r.to_dict() for r in results]
        report["data_files"] = dict(sorted(ctx.files_read.items()))
        report["provenance"] = provenance(started)
        text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
        (out_dir / RESULTS_FILE).write_text(text, encoding="utf-8")  # not the locale's: Ethiopic samples
    return report


def default_out_dir(model_path: Path) -> Path:
    """RUN/eval for a run directory (or a checkpoint inside one), else MODEL/eval: also for an exported
    directory inside a run (RUN/export/hf), whose results must not replace the run's own."""
    if (model_path / "config.json").is_file() and (model_path / WEIGHTS_FILE).is_file():
        return model_path / "eval"
    for candidate in (model_path, *model_path.resolve().parents):  # a relative `best` has no parents
        if (candidate / "train").is_dir() and RunLayout(candidate).tokenizer.is_dir():
            return candidate / "eval"
    return model_path / "eval"
