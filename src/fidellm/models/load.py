"""Load a trained model from wherever it lives: an exported directory (HF Llama or H-Net), a checkpoint,
or a run directory.

Every stage that uses a model (generate, eval, export, serve) goes through `load_model`, so all of them
accept the same paths. The architecture comes from the saved config (`fidellm.models.factory`), so one
loader serves Llama and H-Net. Only safetensors and JSON are read (no pickle).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fidellm.errors import FidelError
from fidellm.export.hf import WEIGHTS_FILE, load_hf_dir
from fidellm.export.hnet import is_hnet_dir, load_hnet_dir
from fidellm.models.factory import build_model, config_from_dict
from fidellm.train.checkpoint import (
    AVERAGE_FILE,
    STATE_FILE,
    latest_checkpoint,
    read_checkpoint,
    restore_checkpoint,
)
from fidellm.train.distributed import pick_device


def load_checkpoint_model(path: Path, device: torch.device | str = "cpu", averaged: bool = True) -> nn.Module:
    """The model saved in a training checkpoint directory (weights only), in eval mode; its architecture
    is the one state.json's "model_config" names (no "arch": Llama). A checkpoint of a run with a weight
    average (`ema_decay`) gives the averaged weights, the ones its validation scored, unless `averaged`
    is False."""
    device = pick_device(device)
    checkpoint = read_checkpoint(Path(path))
    if "model_config" not in checkpoint.state:
        raise FidelError(f"{Path(path) / STATE_FILE}: no model_config (not a model checkpoint)")
    if _holds_adapters(checkpoint.state, checkpoint.path):  # an SFT run's adapters and frozen base
        run = next((p.parent for p in Path(path).absolute().parents if p.name == "train"), Path("OUTPUT"))
        raise FidelError(
            f"{path}: LoRA adapters, not a whole model: use the merged model {run / 'merged'}"
            " (`fidellm sft` writes it unless --no-merge)"
        )
    model = build_model(config_from_dict(checkpoint.state["model_config"])).to(device)
    averaged = averaged and (checkpoint.path / AVERAGE_FILE).is_file()
    restore_checkpoint(
        checkpoint, model, restore_rng=False, weights_file=AVERAGE_FILE if averaged else "model.safetensors"
    )
    return model.eval()


def _holds_adapters(state: dict, directory: Path) -> bool:
    """Whether a checkpoint holds LoRA adapters beside a frozen base: its train_config says so, or (as in
    RUN/train/best, which keeps no train_config) its weights have peft's adapter names."""
    if (state.get("train_config") or {}).get("lora"):
        return True
    weights = directory / "model.safetensors"
    if not weights.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return any(".lora_A." in name for name in handle.keys())  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise FidelError(f"{weights}: cannot read safetensors: {error}") from error


def checkpoint_tokenizer(checkpoint: Path) -> Path:
    """The `tokenizer` directory of the nearest folder above `checkpoint` that has one (its run's,
    RUN/tokenizer, or an SFT run's); the path is resolved first, so relative paths and `.` work."""
    above = checkpoint.resolve().parents
    found = next((folder / "tokenizer" for folder in above if (folder / "tokenizer").is_dir()), None)
    if found is None:
        raise FidelError(
            f"{checkpoint}: no tokenizer for this checkpoint; looked for a tokenizer/ directory in"
            f" {', '.join(map(str, above))} (keep the checkpoint inside its run directory)"
        )
    return found


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Path]:
    """(model, tokenizer directory) from an exported HF or H-Net directory, a checkpoint directory (also
    RUN/train/best, the best-validation weights), or a run directory (its latest checkpoint).

    `device` ("auto", "cpu", "cuda:1", ...) is checked first: a bad one is a one-line FidelError."""
    device = pick_device(device)
    path = Path(path)
    if (path / "config.json").is_file() and (path / WEIGHTS_FILE).is_file():
        if is_hnet_dir(path):
            return load_hnet_dir(path).to(device), path
        model, _ = load_hf_dir(path)
        return model.to(device), path
    if (path / STATE_FILE).is_file():  # RUN/train/checkpoints/step_N, RUN/train/best, RUN/sft/merged
        return load_checkpoint_model(path, device), checkpoint_tokenizer(path)
    latest = latest_checkpoint(path / "train" / "checkpoints")
    if latest is not None:
        return load_checkpoint_model(latest, device), path / "tokenizer"
    raise FidelError(
        f"{path}: no model here — expected an exported directory (config.json + {WEIGHTS_FILE}), a "
        "checkpoint directory, or a run directory with RUN/train/checkpoints (run `fidellm train RUN`)"
    )
