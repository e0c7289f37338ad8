"""Time of one Mamba-2 layer (the H-Net's encoder/decoder mixer, its chunked SSD scan inside): forward
without gradients (evaluation) and forward + backward (training), median of repeats.

Usage: python benchmarks/bench_mamba2.py [--batch 8] [--length 2048] [--d-model 128] [--headdim 32]
       [--d-state 32] [--ngroups 1] [--chunk-size 16] [--repeats 11] [--device cpu|cuda]
The defaults are hnet-tiny's encoder layer on a batch of FLORES-length byte windows, as `fidellm eval`
scores them. Prints one markdown row per measurement (see common.py).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import markdown_row, timed_calls

from fidellm.models.hnet.mamba2 import Mamba2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--headdim", type=int, default=32)
    parser.add_argument("--d-state", type=int, default=32)
    parser.add_argument("--ngroups", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    layer = Mamba2(
        args.d_model,
        d_state=args.d_state,
        d_conv=4,
        expand=2,
        headdim=args.headdim,
        ngroups=args.ngroups,
        chunk_size=args.chunk_size,
    ).to(device)
    u = torch.randn(args.batch, args.length, args.d_model, device=device)

    def forward() -> None:
        with torch.no_grad():
            layer(u)

    def train_step() -> None:
        layer(u.requires_grad_()).square().mean().backward()

    shape = (
        f"Mamba-2 layer d_model {args.d_model}, {layer.nheads} heads x {args.headdim}, state {args.d_state}, "
        f"{args.ngroups} group(s), chunk {args.chunk_size}, batch {args.batch} x {args.length}, {device.type}"
    )
    command = "python " + " ".join(sys.argv)
    for what, run in (("forward", forward), ("forward + backward", train_step)):
        seconds = timed_calls(run, args.repeats, device)
        print(markdown_row(f"{shape}: {what}", command, [s * 1000 for s in seconds], "ms"))


if __name__ == "__main__":
    main()
