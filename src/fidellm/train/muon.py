"""Muon: the momentum of each hidden weight matrix, orthogonalized by a Newton-Schulz iteration, is the
update (Keller Jordan, https://kellerjordan.github.io/posts/muon/; `fidellm.train.optim` decides which
matrices it takes).

The arithmetic is torch.optim.Muon's (torch >= 2.9) with Moonshot's `match_rms_adamw` scaling, so one
learning rate and weight decay serve Muon and the AdamW beside it: per matrix W with gradient G,
momentum buffer M ← μM + (1 − μ)G, Nesterov update U = (1 − μ)G + μM, O = NS₅(U / ‖U‖_F),
W ← W(1 − lr·wd) − lr · 0.2·√max(rows, cols) · O. Written here rather than taken from torch because
torch's runs the iteration in bf16 always — on a CPU without bf16 matrix units that is ~30× slower than
fp32 (a 256 × 688 matrix on the 2-core AMD EPYC: 98 ms against 3.4 ms per iteration) — and one matrix
at a time: here matrices of one shape are orthogonalized together in batched matmuls (a handful of
kernels per step instead of 15 per matrix), in bf16 on CUDA and fp32 elsewhere, and torch 2.4 runs it.
tests/test_muon.py checks it against torch.optim.Muon. Under FSDP2 (parameters sharded by rows over a
1-D mesh) each matrix's iteration runs on one process, which receives the matrix's rows from the others
and sends them their rows of the result (`fidellm.train.muon_shards`); other DTensor layouts gather the
whole update on every process and keep their own rows of the result. Under DDP (`process_group`) each
process orthogonalizes a share of the matrices and the results are all-gathered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fidellm.errors import FidelError
from fidellm.train.distributed import dtensor_types, is_dtensor
from fidellm.train.muon_shards import (
    orthogonalize_replicated,
    orthogonalize_sharded,
    row_sharded,
    rows_per_process,
)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""The quintic's (a, b, c): maximal slope at zero; singular values land in about [0.7, 1.2], not 1."""


def orthogonalize(
    updates: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> Tensor:
    """A batch of matrices (n, rows, cols), each mapped to about its nearest semi-orthogonal matrix
    U Vᵀ by `steps` Newton-Schulz iterations, computed in `dtype` (default: the input's)."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype or updates.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (module docstring); `ns_dtype` None: bf16 on CUDA, fp32 elsewhere.
    `process_group`: the processes of a DDP job (every one holding the same whole matrices), which then
    share the Newton-Schulz work; FSDP2 shards share it without one.

    Like fused AdamW it can skip a step on the device: with a `found_inf` tensor set (1.0: the step's
    loss or gradient was not finite; `fidellm.train.step`) the weights and momentum stay as they were,
    bit for bit, by arithmetic masks rather than saved copies, so the loop need not wait for the loss
    before updating.
    """

    skips_on_device = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        ns_steps: int = 5,
        eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        if not 0 <= momentum < 1:
            raise FidelError(f"Muon: momentum must lie in [0, 1), got {momentum}")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "ns_steps": ns_steps,
            "eps": eps,
        }
        super().__init__(params, defaults)
        shapes = [tuple(p.shape) for group in self.param_groups for p in group["params"] if p.ndim != 2]
        if shapes:
            raise FidelError(
                f"Muon takes 2-D matrices only; got parameters of shape {', '.join(map(str, shapes))}"
            )
        self.ns_dtype = ns_dtype
        self.process_group = process_group
        self.shard_rows: dict[tuple[int, ...], list[int]] = {}  # FSDP2: rows per process, by shape

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            weights = [local_part(p) for p in params]
            grads = [local_part(p.grad) for p in params]
            buffers = [local_part(self.state[p]["momentum_buffer"]) for p in params]
            momentum, lr, decay = group["momentum"], group["lr"], 1 - group["lr"] * group["weight_decay"]
            keep = None
            if found_inf is not None:  # a non-finite step leaves weights and momentum as they were
                keep = 1 - found_inf
                decay = torch.where(found_inf.bool(), 1.0, decay)  # type: ignore[assignment]
                skip_gradients(grads, buffers, found_inf, keep)
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum)  # Nesterov
            if group["weight_decay"]:
                torch._foreach_mul_(weights, decay)
            by_shape: dict[tuple[Any, ...], list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((tuple(p.shape), p.device, p.dtype, row_sharded(p)), []).append(i)
            next_owner = 0
            for (shape, device, dtype, sharded), indices in by_shape.items():
                ns_dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
                steps, eps = group["ns_steps"], group["eps"]
                finish = partial(_update, steps=steps, eps=eps, ns_dtype=ns_dtype, dtype=dtype, keep=keep)
                parts = [updates[i] for i in indices]
                # the processes sharing the work (fidellm.train.muon_shards): FSDP2's mesh or DDP's group
                procs = params[indices[0]].device_mesh.get_group() if sharded else self.process_group
                if procs is None:
                    wholes = [whole_matrix(u, params[i]) for u, i in zip(parts, indices, strict=True)]
                    ortho = finish(torch.stack(wholes))
                    own = [own_rows(o, params[i]) for o, i in zip(ortho.unbind(0), indices, strict=True)]
                else:  # each matrix orthogonalized by one owner, round robin
                    owners = [(next_owner + m) % dist.get_world_size(procs) for m in range(len(indices))]
                    next_owner += len(indices)
                    if sharded:
                        if shape not in self.shard_rows:
                            self.shard_rows[shape] = rows_per_process(parts[0], procs)
                        own = orthogonalize_sharded(parts, self.shard_rows[shape], owners, procs, finish)
                    else:
                        own = orthogonalize_replicated(parts, owners, procs, finish)
                scale = lr * 0.2 * math.sqrt(max(shape))  # Muon's update at AdamW's RMS
                torch._foreach_add_([weights[i] for i in indices], own, alpha=-scale)


def _update(
    stacked: Tensor, steps: int, eps: float, ns_dtype: torch.dtype, dtype: torch.dtype, keep: Tensor | None
) -> Tensor:
    """The orthogonalized updates of a batch of matrices in `dtype`, × `keep` (0 on a skipped step)."""
    ortho = orthogonalize(stacked, steps, eps, ns_dtype).to(dtype)
    return ortho.mul_(keep) if keep is not None else ortho


def local_part(tensor: Tensor) -> Tensor:
    """This process's part of `tensor`: the shard of an FSDP2 DTensor (a view: in-place changes reach
    the DTensor), else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def whole_matrix(part: Tensor, like: Tensor) -> Tensor:
    """The whole matrix of which `part` is this process's shard laid out as parameter `like` (an FSDP2
    DTensor; gathered from every process: Newton-Schulz needs the whole matrix), else `part`."""
    if not is_dtensor(like):
        return part
    dtensor, _ = dtensor_types()
    return dtensor.from_local(
        part, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    ).full_tensor()


def own_rows(matrix: Tensor, like: Tensor) -> Tensor:
    """This process's shard of a whole `matrix` laid out as parameter `like` (no communication), or the
    matrix itself when `like` is not a DTensor."""
    if not is_dtensor(like):
        return matrix
    dtensor, replicate = dtensor_types()
    mesh = like.device_mesh
    replicated = dtensor.from_local(matrix, mesh, [replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


def skip_gradients(grads: list[Tensor], buffers: list[Tensor], found_inf: Tensor, keep: Tensor) -> None:
    """Where `found_inf` is 1, each gradient becomes its momentum buffer, so the momentum step
    M + (1 − μ)(G − M) leaves M exactly as it was and the update is finite (then scaled by `keep` = 0);
    where it is 0, the gradients stay bit for bit. In place, no copies: the sync-free loop's skip costs
    three passes over the gradients (nan_to_num, ×keep, +M·found_inf)."""
    for grad in grads:
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)  # inf · 0 would be NaN
    torch._foreach_mul_(grads, keep)
    torch._foreach_addcmul_(grads, buffers, [found_inf] * len(grads))
