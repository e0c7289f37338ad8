"""LoRA through peft, injected in place into our model, and merging it back into plain weights.

`apply_lora` uses peft's `inject_adapter_in_model`: the target Linear layers become peft LoRA layers
(`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`, ...) while the model stays our
LlamaForCausalLM, so the training loop, activation checkpointing and checkpoints work unchanged; every
non-LoRA parameter is frozen, and AdamW only sees the LoRA matrices. Checkpoints hold the whole
injected state dict and restore into a model injected with the same spec. `merge_lora` folds each
adapter into its base weight (what peft's `merge_and_unload` does) and puts the plain Linear back,
so the result saves, loads and exports as an ordinary model.

Targets are Linear layer names: by default every projection of the attention, Mamba-2 mixer and MLP
of the architecture (`DEFAULT_TARGETS`). QLoRA (`quantize: "nf4"`) first turns the base model's
Linear layers into frozen 4-bit NF4 ones (`fidellm.sft.qlora`); merging dequantizes them again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from fidellm.compat import require_transformers_for_torch
from fidellm.errors import FidelError

DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "hnet": ("Wqkv", "out_proj", "in_proj", "fc1", "fc2"),
}
"""Per architecture: attention, mixer and MLP projections (HF Llama's names; the H-Net reference's)."""

QUANTIZATIONS = ("nf4",)


def lora_spec(
    rank: int,
    alpha: float,
    targets: str | list[str] | None = None,
    dropout: float = 0.0,
    quantize: str | None = None,
) -> dict[str, Any]:
    """A validated, JSON-able LoRA spec (stored in TrainConfig.lora and every checkpoint). `targets`
    None = the architecture's `DEFAULT_TARGETS`, chosen when the model is known; `quantize` "nf4" =
    QLoRA."""
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else targets
    if names is not None and (not names or not all(name.isidentifier() for name in names)):
        raise FidelError(f"--lora-targets: expected comma-separated Linear layer names, got {targets!r}")
    if rank < 1 or not (math.isfinite(alpha) and alpha > 0) or not 0 <= dropout < 1:
        raise FidelError(
            "LoRA: rank must be >= 1, alpha a finite number > 0 and dropout in [0, 1);"
            f" got rank {rank}, alpha {alpha}, dropout {dropout}"
        )
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FidelError(f"LoRA: quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    spec: dict[str, Any] = {"rank": rank, "alpha": alpha, "targets": names, "dropout": dropout}
    if quantize is not None:
        spec["quantize"] = quantize
    return spec


def architecture(model: nn.Module) -> str:
    """ "hnet" or "llama": which `DEFAULT_TARGETS` apply."""
    from fidellm.models.hnet import HNetConfig

    return "hnet" if isinstance(getattr(model, "config", None), HNetConfig) else "llama"


def resolve_targets(model: nn.Module, spec: dict[str, Any]) -> list[str]:
    """The spec's targets, or the architecture's defaults; each must name a Linear layer of `model`."""
    arch = architecture(model)
    targets = list(spec.get("targets") or DEFAULT_TARGETS[arch])
    linear = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear.discard("lm_head")
    unknown = sorted(set(targets) - linear)
    if unknown:
        raise FidelError(
            f"--lora-targets: {unknown} name no Linear layer of this {arch} model;"
            f" choose from {sorted(linear)}"
        )
    return targets


def apply_lora(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """`model` with LoRA adapters injected into the `spec` targets; only adapter weights train. With
    `quantize`, the base's Linear layers become frozen NF4 layers first (QLoRA)."""
    require_transformers_for_torch("LoRA (peft)")
    from peft import LoraConfig, inject_adapter_in_model

    targets = resolve_targets(model, spec)
    if spec.get("quantize"):
        from fidellm.sft.qlora import quantize_linear_layers

        quantize_linear_layers(model, set(DEFAULT_TARGETS[architecture(model)]) | set(targets))
    config = LoraConfig(
        r=int(spec["rank"]),
        lora_alpha=spec["alpha"],
        target_modules=targets,
        lora_dropout=spec.get("dropout", 0.0),
        bias="none",
    )
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and replace the LoRA layer with it (in place); 4-bit
    base layers (QLoRA) become plain Linear layers holding the dequantized weight plus the adapter's."""
    require_transformers_for_torch("Merging LoRA (peft)")
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fidellm.sft.qlora import dequantize_linear_layers, merged_linear

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise FidelError("merge: the model has no LoRA layers")
    for name, module in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged_linear(module))
    dequantize_linear_layers(model)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def merge_run(run_dir: Path) -> Path:
    """Merge the LoRA adapters of the run's best-validation weights (RUN/train/best; the latest
    checkpoint, its average when it keeps one, when the run never evaluated) into RUN/merged: a plain
    weights directory (model.safetensors + state.json) that load_model, generate and `fidellm export
    hf` read, with RUN/tokenizer as its tokenizer."""
    from fidellm.models.factory import build_model, config_from_dict
    from fidellm.models.load import load_model
    from fidellm.train.checkpoint import (
        AVERAGE_FILE,
        latest_checkpoint,
        read_checkpoint,
        restore_checkpoint,
        save_weights,
    )

    latest = latest_checkpoint(run_dir / "train" / "checkpoints")
    if latest is None:
        raise FidelError(f"{run_dir}: no checkpoint under train/checkpoints to merge")
    train_config = read_checkpoint(latest).state.get("train_config", {})
    spec = train_config.get("lora")
    if not spec:
        raise FidelError(f"{latest}: not a LoRA checkpoint (train_config.lora is empty)")
    best = run_dir / "train" / "best"  # with a weight average (ema_decay): the averaged weights
    source = read_checkpoint(best if (best / "state.json").is_file() else latest)
    averaged = source.path == latest and (latest / AVERAGE_FILE).is_file()
    if spec.get("quantize"):  # 4-bit states depend on the weights: quantize the same base again
        if not train_config.get("base") or not Path(train_config["base"]).exists():
            raise FidelError(f"{run_dir}: merging QLoRA needs its base model, {train_config.get('base')}")
        model, _ = load_model(train_config["base"])
    else:
        model = build_model(config_from_dict(source.state["model_config"]))
    model = apply_lora(model, spec)
    restore_checkpoint(
        source, model, restore_rng=False, weights_file=AVERAGE_FILE if averaged else "model.safetensors"
    )
    merged = merge_lora(model)
    state = {"model_config": source.state["model_config"], "lora": spec, "merged_from": str(source.path)}
    if "val_loss" in source.state:
        state["val_loss"] = source.state["val_loss"]
    return save_weights(run_dir / "merged", source.step, merged, state)
