"""AdamW (or Muon for the hidden matrices) with weight decay on matrices only, and the learning-rate
schedules as plain functions of step.

Decay policy: only the weights of Linear layers (2-D, not embeddings) are decayed. Norm gains are never
decayed (decay would pull them towards 0, not towards their init of 1), there are no biases, and the
token embedding — which is also the output matrix when tied — is not decayed either: rows of rare
tokens get few gradient updates, so decay would shrink them step after step towards zero.

Muon (`optimizer="muon"`, `fidellm.train.muon`) replaces AdamW on exactly the decayed 2-D matrices
except an output head: their momentum is orthogonalized (Newton-Schulz) before the update, so every
direction of a matrix moves by the same amount. Embeddings, the output head, norms, vectors and the
H-Net's convolutions stay with AdamW (Keller Jordan's recipe, as in modded-nanogpt and nanochat).
Muon's update is scaled to AdamW's RMS (Moonshot's `match_rms_adamw`), so one --lr and --weight-decay
serve both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fidellm.errors import FidelError
from fidellm.train.muon import Muon
from fidellm.train.step import updates_skip_on_device

SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
MUON_MOMENTUM = 0.95
"""Muon's (Nesterov) momentum: Keller Jordan's and torch.optim.Muon's default."""


def param_groups(
    model: nn.Module, weight_decay: float, stage_lr_multipliers: Sequence[float] = (), muon: bool = False
) -> list[dict]:
    """Optimizer groups: decayed (non-embedding matrices) and undecayed (embeddings, norms, vectors, and
    what the model's own rules exempt), split further by stage when `stage_lr_multipliers` (outermost
    stage first, H-Net) are given; each group carries its "lr_mult". With `muon`, the decayed 2-D
    matrices other than an output head (`lm_head`) form groups of their own marked "muon": True. Tied
    parameters appear once; frozen parameters are left out.
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
        matrix = muon and decayed and param.ndim == 2 and "lm_head" not in name.split(".")
        stage = stages.get(name, 0) if stage_lr_multipliers else 0
        groups.setdefault((matrix, decayed, stage), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decayed else 0.0,
            "lr_mult": stage_lr_multipliers[stage] if stage_lr_multipliers else 1.0,
            **({"muon": matrix} if muon else {}),
        }
        for (matrix, decayed, stage), params in sorted(
            groups.items(), key=lambda item: (not item[0][0], not item[0][1], item[0][2])
        )
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


class OptimizerChain:
    """Several optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest): what the
    training loop, GradScaler and checkpoints use of an optimizer — `param_groups` (the members' own
    group dicts, so a learning rate set here reaches them), `step`, `zero_grad`, `state_dict`."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.defaults: dict[str, Any] = {}
        self.skips_on_device = all(updates_skip_on_device(optimizer) for optimizer in optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # read anew each time: load_state_dict gives the members new group dicts
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        """Step every member, handing on the sync-free loop's `found_inf` (skip on the device)."""
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for optimizer in self.optimizers:
            if found_inf is None:
                optimizer.step()
                continue
            optimizer.found_inf, optimizer.grad_scale = found_inf, grad_scale  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"]  # KeyError for another optimizer's state, as torch's own
        if len(states) != len(self.optimizers):
            raise ValueError(f"{len(states)} optimizer states for {len(self.optimizers)} optimizers")
        for optimizer, saved in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(saved)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    stage_lr_multipliers: Sequence[float] = (),
    fused: bool | None = None,
    kind: str = "adamw",
    process_group: dist.ProcessGroup | None = None,
) -> torch.optim.Optimizer | OptimizerChain:
    """AdamW over `param_groups` (kind "adamw"), or Muon on the hidden matrices chained with AdamW on the
    rest (kind "muon"; see the module docstring). AdamW is fused (one kernel, and updates skippable on
    the device) by default when the parameters live on CUDA. `process_group`: a DDP job's processes,
    among which Muon shares its Newton-Schulz work."""
    if kind not in OPTIMIZERS:
        raise FidelError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    groups = param_groups(model, weight_decay, stage_lr_multipliers, muon=kind == "muon")
    rest = [group for group in groups if not group.get("muon")]
    if kind == "adamw":
        return torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, fused=fused or None)
    matrices = [group for group in groups if group.get("muon")]
    if not matrices:
        raise FidelError("optimizer muon: the model has no trainable hidden matrices for Muon; use adamw")
    optimizers: list[torch.optim.Optimizer] = [
        Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM, process_group=process_group)
    ]
    if rest:  # LoRA adapters may all be matrices
        optimizers.append(torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, fused=fused or None))
    return OptimizerChain(*optimizers)


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
