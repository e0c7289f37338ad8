"""Atomic checkpoints and exact resume.

A checkpoint is a directory CKPT_DIR/step_NNNNNNNN/ holding
  model.safetensors  the weights (tied embedding stored once)
  average.safetensors  with `ema_decay`: the averaged weights (fidellm.train.average), loaded by
                     `fidellm.models.load` in their place
  optimizer.pt       the optimizer state dict (tensors and numbers only: loads with weights_only=True)
  rng.pt             torch CPU and CUDA generator states of every rank
  state.json         step, world size, data position, python and numpy RNG states, configs
Weights and optimizer state are always complete (unsharded), so any process count can resume them.
It is written into a hidden temporary directory, each file fsynced, then renamed into place with
os.replace, so a crash (even kill -9) mid-save leaves either the complete new checkpoint or none:
loaders only ever see step_* directories, never the temporary ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fidellm.errors import FidelError
from fidellm.jsonfile import read_json_object
from fidellm.sft.qlora import quantized_keys
from fidellm.train.distributed import (
    Distributed,
    full_model_state,
    full_optimizer_state,
    load_full_states,
)

SINGLE = Distributed()

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"
AVERAGE_FILE = "average.safetensors"
"""A checkpoint's averaged weights (fidellm.train.average), beside model.safetensors (the trained ones)."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def refuse_old_checkpoints(directory: Path) -> None:
    """Refuse a fresh start (no resume) beside an earlier run's checkpoints: their higher steps would win
    over the new run's everywhere later (summary, generate, export, eval) while metrics.jsonl is new."""
    found = latest_checkpoint(directory)
    if found is not None:
        raise FidelError(
            f"{directory} holds checkpoints of an earlier run (newest {found.name}); without resume they"
            f" would mix with the new run's. Use a new run dir, or remove {directory.parent} (or resume)"
        )


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, tensor states of torch CPU and every CUDA device)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` captured (CUDA states only where the devices exist)."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that are another parameter (tied weights), mapped to the name kept in files."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _write_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors of `weights` with each tied parameter stored once (under its first name)."""
    aliases = tied_aliases(model)
    kept = {name: t.contiguous() for name, t in weights.items() if name not in aliases}
    save_file(kept, str(path), metadata={"format": "pt"})


def read_weights(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The full state dict of `model` from a weights file (tied names filled in), checked by name/shape."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise FidelError(f"{path}: cannot read safetensors: {error}") from error
    for alias, name in tied_aliases(model).items():
        if name in weights:
            weights.setdefault(alias, weights[name])
    skipped = quantized_keys(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in skipped}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [n for n in expected.keys() & weights.keys() if tuple(weights[n].shape) != expected[n]]
    if missing or unexpected or wrong:
        raise FidelError(
            f"{path}: does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]},"
            f" wrong shape {sorted(wrong)[:5]})"
        )
    return weights


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    scaler: torch.amp.GradScaler | None = None,
    ctx: Distributed = SINGLE,
    average: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the newest `keep_last`.

    `state` (JSON-able: data position, configs, ...) is stored in state.json with the step and RNG states;
    `average` (complete weights, `WeightAverage.full_state`) in average.safetensors.
    In a multi-process run every rank calls this (gathering sharded states is collective, and each
    rank's torch RNG state is kept); rank 0 alone writes.
    """
    weights = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    plain_rng, tensor_rng = rng_state()
    rank_rngs = ctx.gather(tensor_rng)
    final = directory / checkpoint_name(step)
    if ctx.main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

        def write(tmp: Path) -> None:
            _write_weights(model, weights, tmp / "model.safetensors")
            if average is not None:
                _write_weights(model, average, tmp / AVERAGE_FILE)
            extra = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
            torch.save({"optimizer": optimizer_state, **extra}, tmp / "optimizer.pt")
            torch.save({"ranks": rank_rngs}, tmp / "rng.pt")
            payload = {"step": step, "world_size": ctx.world_size, "rng": plain_rng, **state}
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

        _replace_atomically(final, write)
        if keep_last > 0:
            for old in list_checkpoints(directory)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def save_weights(
    directory: Path, step: int, model: nn.Module, state: dict[str, Any], ctx: Distributed = SINGLE
) -> Path:
    """Weights and a state.json only (no optimizer or RNG), atomically: e.g. the best-validation model.

    Collective in a multi-process run (every rank calls it); rank 0 writes.
    """
    weights = full_model_state(model)
    if ctx.main:
        directory.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            _write_weights(model, weights, tmp / "model.safetensors")
            payload = {"step": step, **state}
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

        _replace_atomically(directory, write)
    ctx.barrier()
    return directory


def _replace_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill a hidden temp directory with `write`, fsync its files, then move it to `final` in one rename."""
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class Checkpoint:
    """A loaded checkpoint's non-tensor state (step, data position, configs) and where it lives."""

    path: Path
    state: dict[str, Any]

    def __post_init__(self) -> None:
        """Check state.json's shape and step here, so no later use of them can crash."""
        if not isinstance(self.state, dict):
            raise FidelError(f"{self.path / STATE_FILE}: not a JSON object; {DAMAGED}")
        step = self.state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise FidelError(
                f"{self.path / STATE_FILE}: field 'step' must be a whole number >= 0, got {step!r}; {DAMAGED}"
            )

    @property
    def step(self) -> int:
        return self.state["step"]

    def field(self, name: str) -> Any:
        """state.json's `name`, or an error naming the file and the field when it is missing."""
        if name not in self.state:
            raise FidelError(f"{self.path / STATE_FILE}: no field {name!r}; {DAMAGED}")
        return self.state[name]


DAMAGED = "delete this checkpoint to resume from the one before, or start a new run dir"


def read_checkpoint(path: Path) -> Checkpoint:
    """The state.json of a checkpoint directory (checked to hold a valid step), with a clear error when it
    is not one."""
    return Checkpoint(path, read_json_object(path / STATE_FILE, DAMAGED))


def _brief(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _load_torch_file(path: Path, key: str) -> dict[str, Any]:
    """A dict saved by `save_checkpoint` with torch.save (tensors only, weights_only), holding `key`;
    a missing, damaged or foreign file is a FidelError naming it, never an unpickling traceback."""
    if not path.is_file():
        raise FidelError(f"{path}: missing; {DAMAGED}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise FidelError(f"{path}: unreadable ({_brief(error)}); {DAMAGED}") from error
    if not isinstance(saved, dict) or key not in saved:
        raise FidelError(f"{path}: no {key!r} entry (not a fidellm checkpoint file); {DAMAGED}")
    return saved


def restore_checkpoint(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
    rank: int = 0,
    weights_file: str = "model.safetensors",
) -> None:
    """Load weights (strictly, from `weights_file`), optimizer and scaler states and this rank's RNG
    states into fresh objects.

    The optimizer keeps its own hyperparameters (built from this run's config): only its state is loaded.

    A rank the checkpoint has no RNG state for (the run had fewer processes) takes rank 0's.
    """
    path = checkpoint.path
    weights = read_weights(model, path / weights_file)
    saved = _load_torch_file(path / "optimizer.pt", "optimizer") if optimizer is not None else {}
    plain_rng = checkpoint.field("rng") if restore_rng else None
    ranks = _load_torch_file(path / "rng.pt", "ranks")["ranks"] if restore_rng else None
    fresh = (
        [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        if optimizer
        else []
    )
    try:
        load_full_states(model, optimizer, weights, saved.get("optimizer"))
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    except (KeyError, ValueError, TypeError) as error:  # torch's messages for a foreign optimizer state
        raise FidelError(
            f"{path / 'optimizer.pt'}: does not fit the optimizer ({_brief(error)}); {DAMAGED}"
        ) from error
    for group, settings in zip(optimizer.param_groups if optimizer else [], fresh, strict=True):
        group.update(settings)  # this run's weight decay, betas, stage lr factors, fused…, not the saved ones
    if ranks is not None:
        if not isinstance(ranks, list) or not ranks:
            raise FidelError(f"{path / 'rng.pt'}: no RNG states in 'ranks'; {DAMAGED}")
        try:
            set_rng_state(plain_rng, ranks[rank if rank < len(ranks) else 0])
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise FidelError(
                f"{path}: RNG state in rng.pt / {STATE_FILE} 'rng' unusable ({_brief(error)}); {DAMAGED}"
            ) from error
