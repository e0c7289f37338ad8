"""Time of one Muon optimizer step on a preset's hidden matrices sharded by FSDP2 (random gradients),
per process; median of repeats in milliseconds, printed by rank 0 as one RESULTS.md row.

Usage: OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/bench_muon_fsdp.py
       [--preset 25m] [--vocab 32000] [--repeats 10] [--device cpu]
The row names the Newton-Schulz layout the installed code used: "sharded" (each matrix orthogonalized by
one process, `fidellm.train.muon_shards`) or "gathered" (every process gathers and orthogonalizes every
matrix); time an older commit with PYTHONPATH=OLD_CHECKOUT/src to compare the two.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from common import markdown_row, timed_calls

from fidellm.models.factory import build_model, preset_config
from fidellm.train.distributed import init_distributed, shutdown_distributed, wrap_model
from fidellm.train.muon import Muon
from fidellm.train.optim import param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="25m")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("FIDELLM_ALLOW_CPU_FSDP", "1")  # torch < 2.9 on CPU: time it anyway
    ctx, device = init_distributed(args.device)
    model = build_model(preset_config("llama", args.preset, args.vocab, 2048, {})).to(device)
    model = wrap_model(model, ctx, device, "fsdp")
    matrices = [p for g in param_groups(model, 0.1, muon=True) if g.get("muon") for p in g["params"]]
    generator = torch.Generator(device).manual_seed(ctx.rank)
    for p in matrices:
        p.grad = torch.zeros_like(p)
        p.grad.to_local().normal_(generator=generator)  # type: ignore[attr-defined]
    optimizer = Muon(matrices, lr=1e-3)
    times = timed_calls(optimizer.step, args.repeats, device)
    layout = "sharded" if getattr(optimizer, "shard_rows", None) else "gathered"
    if ctx.main:
        command = (
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} torchrun --standalone --nproc-per-node"
            f" {ctx.world_size} benchmarks/bench_muon_fsdp.py --preset {args.preset} --vocab {args.vocab}"
            f" --repeats {args.repeats} --device {args.device}"
        )
        what = (
            f"Muon step under FSDP2, {args.preset}: {len(matrices)} matrices, {ctx.world_size} processes on"
            f" {device.type}, Newton-Schulz {layout}"
        )
        print(markdown_row(what, command, [1000 * t for t in times], "ms"), flush=True)
    shutdown_distributed(ctx)


if __name__ == "__main__":
    sys.exit(main())
