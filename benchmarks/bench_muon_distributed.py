"""Time of one Muon optimizer step on a preset's hidden matrices (random gradients) in a job of several
processes, per process; median of repeats in milliseconds, printed by rank 0 as RESULTS.md rows.

Usage: OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/bench_muon_distributed.py
       [--strategy fsdp|ddp] [--preset 25m] [--vocab 32000] [--repeats 10] [--device cpu]
fsdp: the matrices sharded by FSDP2; the row names the Newton-Schulz layout the installed code used,
"sharded" (each matrix orthogonalized by one process, `fidellm.train.muon_shards`) or "gathered" (every
process gathers and orthogonalizes every matrix): time an older commit with PYTHONPATH=OLD_CHECKOUT/src
to compare. ddp: whole matrices on every process, Muon with the job's process group (each process
orthogonalizes a share, then all-gather) and without one (every process orthogonalizes every matrix).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from common import markdown_row, timed_calls

from fidellm.models.factory import build_model, preset_config
from fidellm.train.distributed import init_distributed, shutdown_distributed, wrap_model
from fidellm.train.muon import Muon
from fidellm.train.optim import param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--preset", default="25m")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("FIDELLM_ALLOW_CPU_FSDP", "1")  # torch < 2.9 on CPU: time it anyway
    ctx, device = init_distributed(args.device)
    model = build_model(preset_config("llama", args.preset, args.vocab, 2048, {})).to(device)
    if args.strategy == "fsdp":
        model = wrap_model(model, ctx, device, "fsdp")
    matrices = [p for g in param_groups(model, 0.1, muon=True) if g.get("muon") for p in g["params"]]
    generator = torch.Generator(device).manual_seed(0)  # DDP: the same averaged gradients everywhere
    for p in matrices:
        p.grad = torch.zeros_like(p)
        local = p.grad.to_local() if args.strategy == "fsdp" else p.grad  # type: ignore[attr-defined]
        local.normal_(generator=generator)
    if args.strategy == "fsdp":  # the layout decides which Newton-Schulz runs
        variants = [("FSDP2", Muon(matrices, lr=1e-3))]
    else:
        shared = Muon(matrices, lr=1e-3, process_group=dist.group.WORLD)
        variants = [("DDP, Newton-Schulz shared (process_group)", shared)]
        variants.append(("DDP, Newton-Schulz on every process", Muon(matrices, lr=1e-3)))
    command = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} torchrun --standalone --nproc-per-node"
        f" {ctx.world_size} benchmarks/bench_muon_distributed.py --strategy {args.strategy} --preset"
        f" {args.preset} --vocab {args.vocab} --repeats {args.repeats} --device {args.device}"
    )
    for name, optimizer in variants:
        times = timed_calls(optimizer.step, args.repeats, device)
        if args.strategy == "fsdp":  # which layout the installed code took (older commits: gathered)
            name += f", Newton-Schulz {'sharded' if getattr(optimizer, 'shard_rows', None) else 'gathered'}"
        if ctx.main:
            what = f"Muon step, {args.preset} ({len(matrices)} matrices), {ctx.world_size} processes on"
            print(markdown_row(f"{what} {device.type}, {name}", command, [1000 * t for t in times], "ms"))
    shutdown_distributed(ctx)


if __name__ == "__main__":
    main()
