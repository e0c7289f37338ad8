"""What every benchmark row records: commit, machine, command, median and spread of repeats."""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from fidellm.eval.results import cpu_name, git_commit


def machine_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores {cpu_name()}, Python {platform.python_version()}"


MARKDOWN_HEADER = "\n".join(
    (
        "| what | median | spread (min-max) | repeats | commit | machine | command |",
        "|---|---|---|---|---|---|---|",
    )
)


def markdown_row(what: str, command: str, values: list[float], unit: str) -> str:
    """One row under MARKDOWN_HEADER: the median and spread of repeated measurements."""
    median = statistics.median(values)
    return (
        f"| {what} | {median:.2f} {unit} | {min(values):.2f}-{max(values):.2f} {unit} | {len(values)} | "
        f"{git_commit()} | {machine_description()} | `{command}` |"
    )


def training_workdir(run: Path, work: Path, shared: tuple[str, ...] = ("tokens", "tokenizer")) -> Path:
    """A run directory for one training experiment sharing `run`'s `shared` folders (symlinks), without
    the training output of an earlier experiment there (training refuses to start beside old checkpoints
    unless it resumes them)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in shared:
        if not (work / name).exists():
            (work / name).symlink_to((run / name).resolve())
    shutil.rmtree(work / "train", ignore_errors=True)
    return work


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a new (spawned) process: its own peak memory, no compiled code carried over."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def timed_calls(run: Callable[[], Any], repeats: int, device: Any) -> list[float]:
    """Wall seconds of each of `repeats` calls of `run` (a torch.device `device`: CUDA is synchronized
    around each call), after two warm-up calls."""
    import torch

    seconds = []
    for index in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            seconds.append(time.perf_counter() - started)
    return seconds


@contextmanager
def llama_cpp_model(llama_cpp: ModuleType, path: Path, **options: Any) -> Iterator[Any]:
    """llama_cpp.Llama(model_path=path, verbose=False, **options) with weight repacking ("extra buffer
    types") off, as tests/test_export_gguf.py loads it (repacked Q8_0 crashes on AMX CPUs,
    ggml-org/llama.cpp#20824; llama.cpp repacks quantized types only, so f32 weights run the same kernels
    either way); closed on exit."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        llm = llama_cpp.Llama(model_path=str(path), verbose=False, **options)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
    try:
        yield llm
    finally:
        llm.close()
