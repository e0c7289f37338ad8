"""The lm-evaluation-harness bridge: our label-likelihood tasks as local lm-eval tasks, run offline.

The shared data is TSV (often .zst) and may not be copied into the repository, so `write_lmeval_tasks`
converts the evaluation sets to JSONL in a directory of the caller's choosing and writes there the packaged
task YAMLs (`fidellm/eval/lmeval_tasks/`) with the JSONL files' absolute paths. That directory then works
with the lm-eval command line as ecosystem.md states it:

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm-eval run --model hf --model_args pretrained=HF_DIR \\
        --include_path TASKS_DIR --tasks fidel_sib200_amh,fidel_afrisenti_amh

or in-process with `run_lm_eval`. lm-eval is the optional dependency `fidel-lm[eval]` (also in `dev`);
nothing here imports it until `run_lm_eval` runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fidellm.compat import require_transformers_for_torch
from fidellm.errors import FidelError
from fidellm.eval.downstream.sib import (
    DEFAULT_SEED,
    TASK_NAMES,
    TASKS_DIR,
    FunctionRef,
    load_choice_task,
    task_splits,
)
from fidellm.paths import resolve_data_dir

METRICS_MODULE = "fidel_metrics.py"  # the `!function` aggregations the YAMLs name, copied beside them
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


class _TaskDumper(yaml.SafeDumper):
    """Writes `FunctionRef`s back as lm-eval's `!function` tags, and strings with newlines double-quoted
    (one line with \\n escapes, as in the packaged files)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_TaskDumper.add_representer(str, _represent_str)
_TaskDumper.add_representer(FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", value))


def write_lmeval_tasks(data_dir: str | Path | None, out_dir: str | Path) -> Path:
    """Write every task of TASK_NAMES into `out_dir`: one JSONL per split (documents as
    `ChoiceTask.record` makes them) and the task YAML pointing at them by absolute path. Returns out_dir."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(data_dir)
    for name in TASK_NAMES:
        task = load_choice_task(name)
        splits = task_splits(name, data_dir)
        data_files = {}
        for split, filename in task.data_files.items():
            if split not in splits:
                raise FidelError(f"{name}.yaml: data_files split {split!r} is not in the data {list(splits)}")
            path = out / Path(filename).name
            lines = (json.dumps(task.record(example), ensure_ascii=False) + "\n" for example in splits[split])
            path.write_text("".join(lines), encoding="utf-8")
            data_files[split] = str(path)
        dataset_kwargs = {**task.config["dataset_kwargs"], "data_files": data_files}
        config = {**task.config, "dataset_kwargs": dataset_kwargs}
        header = f"# Written by fidellm from the packaged {name}.yaml and the data in {data_dir}.\n"
        body = yaml.dump(config, Dumper=_TaskDumper, allow_unicode=True, sort_keys=False, width=110)
        (out / f"{name}.yaml").write_text(header + body, encoding="utf-8")
    metrics = (TASKS_DIR / METRICS_MODULE).read_text(encoding="utf-8")
    (out / METRICS_MODULE).write_text(metrics, encoding="utf-8")
    return out


@contextmanager
def offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 for the duration, also in huggingface_hub and datasets
    when they were imported before (they read the variables once, at import); restored afterwards."""
    saved_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
    modules = [
        (sys.modules.get(module), attribute)
        for module, attribute in (
            ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
            ("datasets.config", "HF_HUB_OFFLINE"),
            ("datasets.config", "HF_DATASETS_OFFLINE"),
        )
    ]
    saved_flags = [(module, attribute, getattr(module, attribute)) for module, attribute in modules if module]
    os.environ.update(OFFLINE_ENV)
    for module, attribute, _ in saved_flags:
        setattr(module, attribute, True)
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for module, attribute, value in saved_flags:
            setattr(module, attribute, value)


def run_lm_eval(
    hf_dir: str | Path,
    tasks_dir: str | Path,
    tasks: Sequence[str] = TASK_NAMES,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = DEFAULT_SEED,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    log_samples: bool = False,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` in this process, offline, with model "hf" on the exported directory
    `hf_dir` and the tasks `write_lmeval_tasks` wrote into `tasks_dir` (lm-eval's built-in tasks are not
    scanned). `seed` is the few-shot sampling seed. Returns lm-eval's result dict (scores under
    ["results"][task], e.g. "acc,none"; per-document samples under ["samples"] when `log_samples`)."""
    hf_dir, tasks_dir = Path(hf_dir), Path(tasks_dir)
    if not (hf_dir / "config.json").is_file():
        raise FidelError(f"{hf_dir}: no config.json; export the model first (`fidellm export hf`)")
    missing = [name for name in tasks if not (tasks_dir / f"{name}.yaml").is_file()]
    if missing:
        raise FidelError(f"{tasks_dir}: no task file for {', '.join(missing)}; run write_lmeval_tasks first")
    require_transformers_for_torch("lm-eval's hf model")
    with offline():
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as error:
            raise FidelError(f"lm-eval is not installed ({error}): pip install 'fidel-lm[eval]'") from error
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir), "dtype": dtype},
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=log_samples,
            task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
            fewshot_random_seed=seed,
        )
    if results is None:  # only rank 0 of a multi-process run gets results
        raise FidelError("lm-eval returned no results (not rank 0?)")
    return dict(results)
