"""Training throughput (tok/s) and MFU of `fidellm.train.loop.train` per preset, on real token shards.

Usage: python benchmarks/bench_train.py RUN [--presets 25m,125m] [--seq-len 1024] [--batch-size 64]
       [--steps 60] [--compile/--no-compile] [--compile-modes default,...] [--loss-chunks 4096,0]
       [--optimizers adamw,muon] [--dtype auto] [--out DIR]
RUN must hold tokens/ and tokenizer/ (as `make demo` leaves them). Every preset × compile mode × loss
chunk (0 = all logits materialized) × optimizer trains in its own run directory under --out (symlinks to RUN's
tokens and tokenizer), one after the other. The first two log intervals (compilation, warm-up) are
left out; the median and spread of the remaining intervals are printed as markdown rows, with the peak
memory of the variant's own process. A variant that fails (e.g. CUDA graphs on an old torch) is
reported and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import MARKDOWN_HEADER, in_fresh_process, markdown_row, training_workdir

from fidellm.train.config import TrainConfig
from fidellm.train.loop import train


def bench_preset(
    run: Path,
    out: Path,
    preset: str,
    compile_mode: str,
    loss_chunk: int,
    optimizer: str,
    args: argparse.Namespace,
) -> dict:
    """Train `preset` for args.steps steps and return the steady-state log records."""
    work = training_workdir(run, out / f"{preset}-{compile_mode}-chunk{loss_chunk}-{optimizer}")
    config = TrainConfig(
        arch="hnet" if preset.startswith("hnet") else "llama",
        preset=preset,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=10,
        lr=args.lr,
        optimizer=optimizer,
        dtype=args.dtype,
        compile=args.compile,
        compile_mode=compile_mode,
        loss_chunk=loss_chunk,
        eval_every=args.steps + 1,
        log_every=args.log_every,
        save_every=0,
        resume=False,
    )
    summary = train(work, config)
    records = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r.get("kind") == "train"][2:]
    if not steady:
        raise SystemExit(f"{preset}: too few log intervals; raise --steps")
    return {"summary": summary, "steady": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--presets", default="25m,125m", help="llama presets, or hnet-* (needs a byte run)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile-modes", default="default", help="comma-separated torch.compile modes")
    parser.add_argument("--loss-chunks", default="4096", help="comma-separated loss chunk sizes (0 = off)")
    parser.add_argument("--optimizers", default="adamw", help="comma-separated: adamw, muon")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_train"))
    args = parser.parse_args()
    command = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    rows, failures = [], []
    variants = [
        (preset, mode, int(chunk), optimizer)
        for preset in args.presets.split(",")
        for mode in (args.compile_modes.split(",") if args.compile else ["default"])
        for chunk in args.loss_chunks.split(",")
        for optimizer in args.optimizers.split(",")
    ]
    for preset, mode, chunk, optimizer in variants:
        what = (
            f"train {preset}, seq {args.seq_len}, batch {args.batch_size}, dtype {args.dtype}, "
            f"compile {args.compile and mode}, loss chunk {chunk or 'off'}, {optimizer}"
        )
        try:  # a fresh process per variant: its own peak memory, no compiled code carried over
            result = in_fresh_process(bench_preset, args.run, args.out, preset, mode, chunk, optimizer, args)
        except Exception as error:  # one broken variant must not cost the rest of a GPU session
            failures.append(f"{what}: {type(error).__name__}: {error}")
            print(f"FAILED {failures[-1]}", flush=True)
            continue
        steady = result["steady"]
        tok_s = [r["tok_per_s"] for r in steady]
        memory = max(r["memory_gib"] for r in steady)
        what += f", {result['summary']['parameters']:,} params, peak {memory:.1f} GiB"
        rows.append(markdown_row(what + ": tok/s", command, tok_s, "tok/s"))
        mfu = [100 * r["mfu"] for r in steady if r.get("mfu") is not None]
        if mfu:
            rows.append(markdown_row(what + ": MFU", command, mfu, "%"))
        print(f"{what}: median {statistics.median(tok_s):,.0f} tok/s", flush=True)
    print(MARKDOWN_HEADER)
    print("\n".join(rows))
    if failures:
        print("\nFailed variants:\n" + "\n".join(f"- {line}" for line in failures))


if __name__ == "__main__":
    main()
