"""Load a trained model from wherever it lives: an exported HF directory, a checkpoint, or a run directory.

Every stage that uses a model (generate, eval, export, serve) goes through `load_model`, so all of them
accept the same paths. Only safetensors and JSON are read (no pickle).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fidellm.errors import FidelError
from fidellm.export.hf import WEIGHTS_FILE, load_hf_dir
from fidellm.models.llama import LlamaConfig, LlamaForCausalLM
from fidellm.train.checkpoint import STATE_FILE, latest_checkpoint, read_checkpoint, restore_checkpoint


def load_checkpoint_model(path: Path, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """The model saved in a training checkpoint directory (weights only), in eval mode."""
    checkpoint = read_checkpoint(Path(path))
    config = LlamaConfig.from_dict(checkpoint.state["model_config"])
    model = LlamaForCausalLM(config).to(device)
    restore_checkpoint(checkpoint, model, restore_rng=False)
    return model.eval()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, Path]:
    """(model, tokenizer directory) from an exported HF directory, a checkpoint directory (also
    RUN/train/best, the best-validation weights), or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / WEIGHTS_FILE).is_file():
        model, _ = load_hf_dir(path)
        return model.to(device), path
    if (path / STATE_FILE).is_file():  # RUN/train/checkpoints/step_N or RUN/train/best
        run = next((p for p in path.parents if (p / "tokenizer").is_dir()), path.parents[2])
        return load_checkpoint_model(path, device), run / "tokenizer"
    latest = latest_checkpoint(path / "train" / "checkpoints")
    if latest is not None:
        return load_checkpoint_model(latest, device), path / "tokenizer"
    raise FidelError(
        f"{path}: no model here — expected an exported HF directory (config.json + {WEIGHTS_FILE}), a "
        "checkpoint directory, or a run directory with RUN/train/checkpoints (run `fidellm train RUN`)"
    )
