"""Atomic checkpoints and exact resume.

A checkpoint is a directory CKPT_DIR/step_NNNNNNNN/ holding
  model.safetensors  the weights (tied embedding stored once)
  optimizer.pt       the optimizer state dict (tensors and numbers only: loads with weights_only=True)
  rng.pt             torch CPU and CUDA generator states
  state.json         step, data position, python and numpy RNG states, model and training configs
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
from safetensors.torch import load_model, save_model
from torch import nn

from fidellm.errors import FidelError

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"


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


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the newest `keep_last`.

    `state` (JSON-able: data position, configs, ...) is stored in state.json with the step and RNG states.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / checkpoint_name(step)

    def write(tmp: Path) -> None:
        plain_rng, tensor_rng = rng_state()
        save_model(model, str(tmp / "model.safetensors"))
        extra = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
        torch.save({"optimizer": optimizer.state_dict(), **extra}, tmp / "optimizer.pt")
        torch.save(tensor_rng, tmp / "rng.pt")
        payload = {"step": step, "rng": plain_rng, **state}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    _replace_atomically(final, write)
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(directory: Path, step: int, model: nn.Module, state: dict[str, Any]) -> Path:
    """Weights and a state.json only (no optimizer or RNG), atomically: e.g. the best-validation model."""
    directory.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        payload = {"step": step, **state}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    return _replace_atomically(directory, write)


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

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read_checkpoint(path: Path) -> Checkpoint:
    """The state.json of a checkpoint directory, with a clear error when it is not one."""
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FidelError(f"{state_path}: not a readable checkpoint state: {error}") from error
    return Checkpoint(path, state)


def restore_checkpoint(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> None:
    """Load weights (strictly), optimizer and scaler states and the RNG states into fresh objects."""
    path = checkpoint.path
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
    if missing or unexpected:
        raise FidelError(
            f"{path / 'model.safetensors'}: does not match the model (missing {sorted(missing)[:5]},"
            f" unexpected {sorted(unexpected)[:5]})"
        )
    if optimizer is not None:
        saved = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    if restore_rng:
        set_rng_state(checkpoint.state["rng"], torch.load(path / "rng.pt", weights_only=True))
