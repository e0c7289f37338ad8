"""AdamW with weight decay on matrices only, and the learning-rate schedules as plain functions of step.

Decay policy: only the weights of Linear layers (2-D, not embeddings) are decayed. Norm gains are never
decayed (decay would pull them towards 0, not towards their init of 1), there are no biases, and the
token embedding — which is also the output matrix when tied — is not decayed either: rows of rare
tokens get few gradient updates, so decay would shrink them step after step towards zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fidellm.errors import FidelError

SCHEDULES = ("cosine", "wsd")


def param_groups(
    model: nn.Module, weight_decay: float, stage_lr_multipliers: Sequence[float] = ()
) -> list[dict]:
    """AdamW groups: decayed (non-embedding matrices) and undecayed (embeddings, norms, vectors, and what
    the model's own rules exempt), split further by stage when `stage_lr_multipliers` (outermost stage
    first, H-Net) are given; each group carries its "lr_mult". Tied parameters appear once; frozen
    parameters are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    exempt, stages = decay_exemptions(model), parameter_stages(model)
    n_stages = max(stages.values(), default=0) + 1
    if stage_lr_multipliers and len(stage_lr_multipliers) != n_stages:
        raise FidelError(
            f"stage_lr_multipliers has {len(stage_lr_multipliers)} entries; the model has {n_stages} stage(s)"
        )
    groups: dict[tuple[bool, int], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        decayed = param.ndim >= 2 and id(param) not in embeddings and not exempt(name)
        stage = stages.get(name, 0) if stage_lr_multipliers else 0
        groups.setdefault((decayed, stage), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decayed else 0.0,
            "lr_mult": stage_lr_multipliers[stage] if stage_lr_multipliers else 1.0,
        }
        for (decayed, stage), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
    ]


def decay_exemptions(model: nn.Module) -> Callable[[str], bool]:
    """The model's own weight-decay exemptions by parameter name (H-Net: SSM dynamics, norms, …)."""
    from fidellm.models.hnet import HNetForCausalLM
    from fidellm.models.hnet.params import no_weight_decay

    return no_weight_decay if isinstance(model, HNetForCausalLM) else (lambda name: False)


def parameter_stages(model: nn.Module) -> dict[str, int]:
    """Parameter name -> stage (0 = outermost); every parameter of a one-stage model is stage 0."""
    from fidellm.models.hnet import HNetForCausalLM
    from fidellm.models.hnet.params import parameter_stages as hnet_stages

    return hnet_stages(model) if isinstance(model, HNetForCausalLM) else {}


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    stage_lr_multipliers: Sequence[float] = (),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused (one kernel, and updates skippable on the device) by default when
    the parameters live on CUDA."""
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    groups = param_groups(model, weight_decay, stage_lr_multipliers)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def _warmup(step: int, warmup_steps: int) -> float | None:
    """Linear warmup factor (step + 1) / warmup_steps during warmup, else None."""
    return (step + 1) / warmup_steps if step < warmup_steps else None


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine from base_lr down to base_lr·min_lr_ratio at total_steps (held after)."""
    factor = _warmup(step, warmup_steps)
    if factor is not None:
        return base_lr * factor
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wsd_lr(
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    decay_fraction: float,
) -> float:
    """Warmup-stable-decay: linear warmup, base_lr held, then a linear decay to base_lr·min_lr_ratio over
    the last round(decay_fraction·total_steps) steps (reached at total_steps and held after)."""
    factor = _warmup(step, warmup_steps)
    if factor is not None:
        return base_lr * factor
    decay_steps = round(decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start) / max(1, decay_steps))
    return base_lr * (1 - (1 - min_lr_ratio) * progress)


def learning_rate(
    schedule: str,
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate of optimizer step `step` (0-based) under `schedule` ("cosine" or "wsd")."""
    if schedule == "cosine":
        return cosine_lr(step, base_lr, warmup_steps, total_steps, min_lr_ratio)
    if schedule == "wsd":
        return wsd_lr(step, base_lr, warmup_steps, total_steps, min_lr_ratio, decay_fraction)
    raise FidelError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
