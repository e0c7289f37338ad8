"""Multi-process training under `torchrun`: process group, model wrapping (DDP or FSDP2), full states.

One process per device. `torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them (a plain
`fidellm train`) everything here is a no-op for a single process. The backend is NCCL on CUDA and gloo
on CPU (the CPU path is what the tests run). Every rank holds the same model and optimizer state
(DDP) or a shard of it (FSDP2); checkpoints always hold the full, unsharded state, written by rank 0,
so a run can resume with any number of processes and any strategy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fidellm.compat import FSDP_ON_CPU, torch_release
from fidellm.errors import FidelError
from fidellm.sft.qlora import quantized_keys

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank among world_size processes, local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0 writes files and prints; the others stay quiet."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of `value` over all ranks (a copy; `value` itself is left alone)."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects only)."""
        if not self.enabled:
            return [obj]
        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, obj)
        return found

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (so all ranks take the same decision, e.g. to stop)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def pick_device(name: str | torch.device) -> torch.device:
    """CUDA for "auto" when available, else CPU; any other name is checked to be a device this machine
    has, so a typo or a missing GPU is one clear line (naming --device) instead of a torch traceback."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError) as error:
            raise FidelError(
                f"--device {name}: not a torch device ({str(error).splitlines()[0]}); use auto, cpu, cuda"
                " or cuda:N"
            ) from None
    if device.type not in DEVICE_TYPES:
        raise FidelError(f"--device {name}: fidellm runs models on {', '.join(DEVICE_TYPES)} only")
    if device.type == "cuda":
        _check_cuda(name, device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise FidelError(f"--device {name}: no MPS (Apple GPU) is available to this torch; use --device cpu")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise FidelError(f"--device {name}: no XPU is available to this torch; use --device cpu")
    return device


def _check_cuda(name: str | torch.device, device: torch.device) -> None:
    """Refuse a CUDA device this process cannot use: a CPU-only torch, no visible GPU, or a bad index."""
    if not torch.cuda.is_available():
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise FidelError(
                f"--device {name}: this torch ({torch.__version__}) has no CUDA (a CPU-only build);"
                " use --device cpu, or install a CUDA build of torch"
            )
        raise FidelError(
            f"--device {name}: no CUDA GPU is visible to torch (check nvidia-smi and CUDA_VISIBLE_DEVICES);"
            " use --device cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise FidelError(
            f"--device {name}: only {count} CUDA device{'s' if count != 1 else ''} visible"
            f" (cuda:0 to cuda:{count - 1})"
        )


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    asked = pick_device(device_name)  # a bad name or a missing GPU fails here, on every rank
    if asked.type not in ("cpu", "cuda"):
        raise FidelError(f"--device {device_name}: several processes (torchrun) run on cuda or cpu only")
    use_cuda = asked.type == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise FidelError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible;"
                " start torchrun with --nproc-per-node at most the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, local_rank), device


def shutdown_distributed(ctx: Distributed, wait: bool = True) -> None:
    """Leave the process group, after all ranks arrive when `wait` (a failing rank does not wait)."""
    if ctx.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _fsdp2(name: str) -> Any:
    """FSDP2's `name` (`fully_shard`, `FSDPModule`): public from torch 2.6, under `_composable` in 2.4/2.5."""
    import torch.distributed.fsdp as public

    if hasattr(public, name):
        return getattr(public, name)
    from torch.distributed._composable import fsdp  # torch < 2.6

    return getattr(fsdp, name)


def wrap_model(model: nn.Module, ctx: Distributed, device: torch.device, strategy: str) -> nn.Module:
    """The module the training step calls: DDP (gradients averaged) or FSDP2 (each block sharded).

    With FSDP2 the parameters of `model` itself become sharded DTensors, so the optimizer must be
    built after this call; with DDP `model` keeps plain tensors and the returned wrapper syncs them.
    """
    if strategy not in STRATEGIES:
        raise FidelError(f"train config: strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if not ctx.enabled:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    checked = not os.environ.get("FIDELLM_ALLOW_CPU_FSDP")
    if device.type == "cpu" and torch_release() < FSDP_ON_CPU and checked:
        raise FidelError(
            f"--strategy fsdp on CPU needs torch >= 2.9 (this is torch {torch.__version__}, whose FSDP2"
            " fails or sums gradients over gloo); use --strategy ddp on CPU, or upgrade torch"
        )
    from fidellm.models.factory import repeated_blocks

    fully_shard = _fsdp2("fully_shard")
    for layer in repeated_blocks(model):
        fully_shard(layer)
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, ctx: Distributed, sync: bool) -> Iterator[None]:
    """Run a micro-step's backward with (`sync`) or without the cross-rank gradient reduction.

    Gradient accumulation only needs the reduction after the last micro-batch: DDP skips it inside
    `no_sync()`, FSDP2 through `set_requires_gradient_sync`.
    """
    if not ctx.enabled or sync:
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(True)
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        module.set_requires_gradient_sync(False)
        yield


def full_value(value: torch.Tensor) -> float:
    """A scalar tensor's value as a float, assembling it first when it is a DTensor (FSDP2 norms)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def reshard(model: nn.Module) -> None:
    """Free FSDP2's gathered copies of the parameters (the root keeps its own after a forward without a
    backward), so that the next forward gathers the shards again: needed after writing the shards in
    place (`fidellm.train.average`). A no-op for a model that is not sharded."""
    if not sharded(model):
        return
    fsdp_module = _fsdp2("FSDPModule")
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (DTensors) rather than plain tensors."""
    return any(is_dtensor(p) for p in model.parameters())


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 parameter, its gradient or optimizer state)."""
    return type(tensor).__name__ == "DTensor"


def dtensor_types() -> tuple[Any, Any]:
    """DTensor and its Replicate placement: public from torch 2.5, under `torch.distributed._tensor`
    in 2.4."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor, Replicate  # type: ignore[no-redef]
    return DTensor, Replicate


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete weights by name on CPU (gathered when sharded: collective, and empty off rank 0)."""
    if not sharded(model):
        skipped = quantized_keys(model)  # QLoRA's frozen 4-bit base is rebuilt from the base model
        return {name: t.detach().cpu() for name, t in model.state_dict().items() if name not in skipped}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state in `optimizer.state_dict()` form, unsharded (when sharded: collective, and
    empty off rank 0)."""
    if not sharded(model):
        return optimizer.state_dict()
    members = getattr(optimizer, "optimizers", None)  # an OptimizerChain: its own state_dict form
    if members is not None:
        states = [full_optimizer_state(model, member) for member in members]
        return {"optimizers": states} if all(states) else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    named = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return _by_index(_optimizer_names(model, optimizer), named) if named else {}  # only rank 0 gets it


def load_full_states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Load full (unsharded) weights and optimizer state, sharding them when the model is sharded."""
    if not sharded(model):
        skipped = quantized_keys(model)
        missing, unexpected = model.load_state_dict(weights, strict=not skipped)
        if not set(missing) <= skipped or unexpected:
            raise FidelError(
                f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is None or optimizer_state is None:
        return
    members = getattr(optimizer, "optimizers", None)  # an OptimizerChain, state as its state_dict's
    pairs = (
        zip(members, optimizer_state["optimizers"], strict=True)
        if members
        else [(optimizer, optimizer_state)]
    )
    for member, state in pairs:
        named = _by_name(_optimizer_names(model, member), state)
        set_optimizer_state_dict(model, member, named, options=options)


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (group by group): index i of its state_dict."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _by_index(names: list[str], named: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (torch.distributed.checkpoint's form) in plain integer-keyed form."""
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: value for name, value in named["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in named["param_groups"]]
    return {"state": state, "param_groups": groups}


def _by_name(names: list[str], plain: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_by_index`."""
    state = {names[int(i)]: value for i, value in plain["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}
