"""Time of a whole H-Net forward pass without gradients (what `fidellm eval` does per batch), and the
part of it spent in the Mamba-2 layers and their SSD scan, median of repeats.

Usage: python benchmarks/bench_hnet_forward.py RUN_OR_MODEL [--batch 8] [--length 2048] [--repeats 5]
       e.g. RUN = runs/demo-bytes from `make demo`. Prints one markdown row per figure (see common.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from common import markdown_row

import fidellm.models.hnet.mamba2 as mamba2
from fidellm.models.load import load_model


def timed(spent: dict[str, float], key: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, adding the seconds of each call to spent[key]."""

    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = function(*args, **kwargs)
        spent[key] += time.perf_counter() - started
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spent: dict[str, float] = defaultdict(float)
    mamba2.ssd_scan = timed(spent, "SSD scan", mamba2.ssd_scan)
    mamba2.Mamba2.forward = timed(spent, "Mamba-2 layers", mamba2.Mamba2.forward)
    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model.eval()
    ids = torch.randint(0, 250, (args.batch, args.length))
    samples: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(args.repeats):
            spent.clear()
            started = time.perf_counter()
            model(ids)
            samples["whole forward"].append(time.perf_counter() - started)
            for key, seconds in spent.items():
                samples[key].append(seconds)
    command = "python " + " ".join(sys.argv)
    for key, seconds in samples.items():
        what = f"H-Net {args.model}, {args.batch} x {args.length} bytes, no grad, cpu: {key}"
        print(markdown_row(what, command, seconds, "s"))


if __name__ == "__main__":
    main()
