"""Peak memory and time of the output-projection loss: all logits vs the fused chunked loss.

Usage: python benchmarks/loss_memory.py [--preset tiny] [--vocab 32000] [--seq-len 1024] [--batch-size 16]
       [--chunks 0,4096] [--repeats 3] [--device auto]
For each chunk size (0 = logits materialized) and each use — a training step's forward + backward
(mean loss) and validation's per-token losses under no_grad — a fresh process builds the preset with
random weights, runs it `--repeats` times on random tokens and reports the median time and the peak
memory above what the model itself holds: CUDA's max_memory_allocated, or the growth of the
process's peak resident memory on a CPU. bf16 autocast on CUDA, fp32 on a CPU, as `fidellm train`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from common import MARKDOWN_HEADER, in_fresh_process, markdown_row

from fidellm.models.llama import LlamaForCausalLM, preset


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args: argparse.Namespace, chunk: int, use: str) -> tuple[list[float], float]:
    """(seconds per repeat, peak GiB above the model's own memory) in this (fresh) process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset(args.preset, args.vocab)).to(device).train(use == "train")
    model.loss_chunk_tokens = chunk
    inputs, targets = (
        torch.randint(0, args.vocab, (args.batch_size, args.seq_len), device=device) for _ in "ab"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_gib(device)
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if use == "train":
                model(inputs, targets).loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(inputs, targets, reduction="none").loss.sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds, peak_gib(device) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunks", default="0,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    command = "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:])
    rows = []
    for use in ("train", "validation"):
        for chunk in (int(c) for c in args.chunks.split(",")):
            seconds, peak = in_fresh_process(measure, args, chunk, use)
            what = (
                f"{use} loss, {args.preset} at vocab {args.vocab}, {args.batch_size}×{args.seq_len} tokens,"
                f" {args.device}, loss chunk {chunk or 'off'}: peak +{peak:.2f} GiB; seconds"
            )
            rows.append(markdown_row(what, command, seconds, "s"))
            print(f"{what} {statistics.median(seconds):.3f}", flush=True)
    print(MARKDOWN_HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
