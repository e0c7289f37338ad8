"""Time of one Muon optimizer step on the hidden matrices of a preset (random gradients): ours
(`fidellm.train.muon.Muon`, matrices of one shape orthogonalized in one batch) against
`torch.optim.Muon` (torch >= 2.9: one matrix at a time, its Newton-Schulz always in bf16); median of
repeats in milliseconds.

Usage: python benchmarks/bench_muon.py [--preset tiny] [--vocab 32000] [--repeats 20] [--device cpu]
On CUDA ours runs the iteration in bf16 like torch's; on CPU in fp32, and is also timed in bf16 there.
Ours is also timed as the CUDA training loop steps it: with a `found_inf` flag, ready to skip the step.
"""

from __future__ import annotations

import argparse

import torch
from common import markdown_row, timed_calls

from fidellm.models.factory import build_model, preset_config
from fidellm.train.muon import Muon
from fidellm.train.optim import param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    command = (
        f"python benchmarks/bench_muon.py --preset {args.preset} --vocab {args.vocab}"
        f" --repeats {args.repeats} --device {args.device}"
    )
    model = build_model(preset_config("llama", args.preset, args.vocab, 2048, {})).to(device)
    groups = [g for g in param_groups(model, 0.1, muon=True) if g.get("muon")]
    matrices = [p for group in groups for p in group["params"]]
    shapes = sorted({tuple(p.shape) for p in matrices})
    for p in matrices:
        p.grad = torch.randn_like(p)
    where = f"{args.preset}: {len(matrices)} matrices of {len(shapes)} shapes, {args.device}"
    variants: list[tuple[str, torch.optim.Optimizer]] = [
        (f"Muon step, ours ({'bf16' if device.type == 'cuda' else 'fp32'} Newton-Schulz, batched by shape)",
         Muon(matrices, lr=1e-3)),
    ]  # fmt: skip
    skipping = Muon(matrices, lr=1e-3)
    skipping.found_inf = torch.zeros((), device=device)  # type: ignore[attr-defined]
    variants.append(("Muon step, ours with the sync-free loop's skip flag (found_inf = 0)", skipping))
    if device.type != "cuda":
        variants.append(
            ("Muon step, ours in bf16 (batched by shape)", Muon(matrices, lr=1e-3, ns_dtype=torch.bfloat16))
        )
    if hasattr(torch.optim, "Muon"):
        torch_muon = torch.optim.Muon(matrices, lr=1e-3, adjust_lr_fn="match_rms_adamw")
        variants.append(("Muon step, torch.optim.Muon (bf16, one matrix at a time)", torch_muon))
    for name, optimizer in variants:
        times = timed_calls(optimizer.step, args.repeats, device)
        print(markdown_row(f"{name}, {where}", command, [1000 * t for t in times], "ms"), flush=True)


if __name__ == "__main__":
    main()
