"""One optimizer update, and the per-step numbers read back without stalling the GPU.

Reading a step's loss on the host (`.item()`) waits for every kernel queued so far, so a loop that
checks each loss before the next step leaves the GPU idle while Python prepares that step — a real
share of a 25 ms step of a small model. With a fused AdamW the loop can go without: the update
itself is skipped on the device when the loss or the gradient norm is not finite (AdamW's own
`found_inf` input, the one GradScaler uses), the numbers travel to pinned host memory behind a CUDA
event, and the loop reads them one step later, when they have long arrived. A non-finite step is
then found before the next update, so the state saved on stopping is still the one before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fidellm.train.distributed import full_value


def updates_skip_on_device(optimizer: Any) -> bool:
    """Whether `optimizer` can skip an update on the device: it takes a `found_inf` flag (fused AdamW,
    `fidellm.train.muon.Muon`, an `OptimizerChain` of such)."""
    return bool(getattr(optimizer, "skips_on_device", False) or optimizer.defaults.get("fused"))


def optimizer_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
    losses: Tensor,
    skip_on_device: bool,
) -> Tensor:
    """Unscale (fp16), clip, step and clear the gradients; returns the gradient norm before clipping.

    With `skip_on_device` the step leaves parameters and optimizer state untouched when `losses` or
    the norm are not finite, decided on the device (no host sync); a GradScaler in use (fp16) makes
    that decision itself.
    """
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if skip_on_device and not scaler.is_enabled():
        whole_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        optimizer.found_inf = (~torch.isfinite(losses.sum() + whole_norm)).float()  # type: ignore[attr-defined]
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
    else:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class StepRecord:
    """What a finished step reports: its number (1-based), learning rate, data position after it, the
    (cross-entropy, auxiliary) losses averaged over ranks, the gradient norm and H-Net chunk sizes."""

    step: int
    lr: float
    data_state: dict[str, Any]
    losses: Tensor
    norm: Tensor | None = None
    chunks: list[Tensor] = field(default_factory=list)
    _ready: Any = None

    def send_to_host(self) -> None:
        """Start copying the losses to pinned host memory; `values()` waits for this copy alone."""
        if self.losses.device.type == "cuda":
            host = torch.empty(self.losses.shape, dtype=self.losses.dtype, pin_memory=True)
            host.copy_(self.losses, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
            self.losses = host

    def values(self) -> tuple[float, float]:
        """(cross-entropy, auxiliary loss) as floats."""
        if self._ready is not None:
            self._ready.synchronize()
        loss, aux = self.losses.tolist()
        return loss, aux

    def finite(self) -> bool:
        loss, aux = self.values()
        return math.isfinite(loss + aux)

    def grad_norm(self) -> float:
        assert self.norm is not None
        return full_value(self.norm)
