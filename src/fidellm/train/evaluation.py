"""Validation during training: mean loss and bits per UTF-8 byte over fixed batches, on every rank."""

from __future__ import annotations

import math
from typing import Any

import torch

from fidellm.models.loss import IGNORE_INDEX
from fidellm.train.checkpoint import SINGLE
from fidellm.train.distributed import Distributed


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list,
    byte_lengths: torch.Tensor,
    device: torch.device,
    autocast: Any,
    ctx: Distributed = SINGLE,
) -> tuple[float, float]:
    """(mean loss in nats per token over all targets, bits per UTF-8 byte over text targets).

    In a multi-process run each rank scores every world_size-th batch and the sums are all-reduced;
    every rank runs the same number of forward passes (a rank out of batches repeats one and drops
    it), since an FSDP2 forward is collective.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, targets, text bits, text bytes
    for first in range(0, len(batches), ctx.world_size):
        index = first + ctx.rank
        inputs, targets = (t.to(device) for t in batches[min(index, len(batches) - 1)])
        with autocast():  # per-token losses, chunked: the full logits never exist
            token_nll = model(inputs, targets, reduction="none").loss
        if index >= len(batches):
            continue
        kept = targets.flatten() != IGNORE_INDEX  # SFT: only assistant targets count
        nll = token_nll.flatten()[kept]
        nbytes = byte_lengths[targets.flatten()[kept]]
        sums += torch.stack(
            [nll.sum(), torch.tensor(nll.numel()), nll[nbytes > 0].sum() / math.log(2), nbytes.sum()]
        ).to(sums)
    model.train(was_training)
    nll_sum, count, text_bits, text_bytes = (ctx.mean(sums) * ctx.world_size).tolist()
    return nll_sum / count, text_bits / max(1.0, text_bytes)
