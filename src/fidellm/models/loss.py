"""Cross-entropy of the output projection without the full logits tensor (a fused linear cross-entropy).

Training a small model with a 32K vocabulary spends much of its memory and bandwidth on the logits:
64 × 1024 tokens give a 2.1G-element matrix, materialized in bf16, again in fp32 for the loss and
again for its gradient. `linear_cross_entropy` walks the tokens in chunks instead: per chunk it
computes the logits (in the autocast dtype, like the `nn.Linear` it replaces), their fp32
log-sum-exp and loss, and right away the chunk's gradients with respect to the hidden states and the
output matrix — so only one chunk of logits ever exists and the backward pass is two scalings.
The arithmetic is the same as `F.cross_entropy(F.linear(h, W).float(), t)`: the same matmuls in the
same dtype and fp32 softmax, only summed in another order (Liger Kernel's fused linear cross-entropy
does this in Triton; this is plain PyTorch, so it runs on CPU and under torch.compile alike).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 4096
"""Tokens per chunk: 4,096 × a 32K vocabulary is 128M logits (512 MB in fp32) at a time."""


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`; gradients made in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, wanted: tuple[bool, bool]
    ) -> Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        grad_hidden = torch.empty_like(hidden) if wanted[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wanted[1] else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        head = weight  # cast once to the dtype the first chunk's logits come in (autocast's), not per chunk
        for start in range(0, hidden.shape[0], chunk):
            part = hidden[start : start + chunk]
            logits = F.linear(part, head)  # the autocast dtype, as lm_head would give
            compute_dtype = logits.dtype
            head = head.to(compute_dtype)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            kept = valid[start : start + chunk]
            picked = targets[start : start + chunk].clamp(min=0).unsqueeze(1)
            total = total - (log_probs.gather(1, picked).squeeze(1) * kept).sum()
            if not any(wanted):
                continue
            # d(sum of losses)/d(logits) = softmax - one-hot; ignored rows are zeroed below through
            # the (chunk, dim) factors, which is cheaper than masking (chunk, vocab)
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad_logits.dtype))
            grad_logits = grad_logits.to(compute_dtype)
            rows = kept.unsqueeze(1).to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (grad_logits @ head) * rows
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ (part.to(compute_dtype) * rows)).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count.clamp(min=1)
        return (
            grad_hidden * scale if grad_hidden is not None else None,
            (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Tensor:
    """Mean cross-entropy (fp32, over targets other than IGNORE_INDEX) of the logits `hidden @ weight.T`.

    hidden (..., dim), weight (vocab, dim), targets (...) of the same leading shape. Equal to
    `F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(),
    ignore_index=IGNORE_INDEX)` up to the order of summation, without ever holding more than
    `chunk_tokens` rows of logits. No target counts: the loss is 0 (not NaN).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    grad_mode = torch.is_grad_enabled()
    wanted = (grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(flat_hidden, weight, targets.reshape(-1), chunk_tokens, wanted)


def token_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Tensor:
    """Per-token cross-entropy (fp32, shaped like `targets`, 0 where IGNORE_INDEX) of `hidden @ weight.T`,
    `chunk_tokens` rows of logits at a time: what evaluation needs (bits per byte weighs every token),
    without the full logits. Differentiable, but it saves each chunk's logits for backward: train on
    `linear_cross_entropy`.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = None
    if not torch.compiler.is_compiling():  # eager: only rows with a target reach the output matrix
        rows = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)  # (padding, prompts, window overlap)
        flat_hidden, flat_targets = flat_hidden.index_select(0, rows), flat_targets[rows]
    pieces = [
        F.cross_entropy(
            F.linear(flat_hidden[start : start + chunk_tokens], weight).float(),
            flat_targets[start : start + chunk_tokens],
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        for start in range(0, flat_hidden.shape[0], chunk_tokens)
    ]
    losses = torch.cat(pieces) if pieces else flat_hidden.new_zeros(0, dtype=torch.float32)
    if rows is None:
        return losses.view(targets.shape)
    return losses.new_zeros(targets.numel()).index_copy(0, rows, losses).view(targets.shape)


REDUCTIONS = ("mean", "none")


def keep_last(x: Tensor, targets: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
    """The last `n` positions of x (batch, seq, ...) and of the targets (batch, seq), for `logits_to_keep`."""
    if n < 0:
        raise ValueError(f"logits_to_keep must be 0 (all positions) or positive, got {n}")
    return x[:, -n:], None if targets is None else targets[:, -n:]


def check_reduction(reduction: str) -> None:
    """Reject a loss reduction other than "mean" (training) and "none" (per token, evaluation)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def logits_loss(logits: Tensor, targets: Tensor | None, reduction: str = "mean") -> Tensor | None:
    """Cross-entropy in fp32 of materialized logits (batch, seq, vocab) against targets (batch, seq):
    the mean over non-ignored targets, or per token (0 where ignored) with reduction "none"; None
    without targets."""
    if targets is None:
        return None
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )  # fmt: skip
    return loss.view(targets.shape) if reduction == "none" else loss
