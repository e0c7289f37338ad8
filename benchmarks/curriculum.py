"""Curriculum vs shuffled order at equal tokens: the same preset, steps, batch, learning rate and seeds,
trained once with the data drawn easy to hard (`--curriculum`) and once in the usual shuffled order.

Usage: python benchmarks/curriculum.py RUN [--steps 300] [--seeds 0,1] [--span 0.5] [--preset tiny]
       [--seq-len 256] [--batch-size 8] [--lr 3e-3] [--warmup 20] [--data-dir DIR] [--out runs/curriculum]
RUN holds data/splits and tokenizer/ (e.g. runs/demo after `make demo`). Its splits are tokenized once
with complexity scores into OUT/tokens (`fidellm data tokenize --curriculum`; the token files are the
same as without the flag). Each arm × seed then trains in OUT/<arm>-s<seed> and its final weights are
scored on FLORES amh dev+devtest (second-half bits, as benchmarks/quality_run.py) and on the held-out
test split (bits/byte over whole documents); the validation loss is the training loop's (val split).
Writes OUT/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine_description, training_workdir
from quality_run import add_training_options, config_from_args

from fidellm.data.split_files import read_split_file, split_files
from fidellm.eval.lm import score_documents, score_lines
from fidellm.eval.results import git_commit
from fidellm.models.load import load_checkpoint_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.report import flores_lines
from fidellm.tokenizer.shards import COMPLEXITY_FILE, tokenize_splits
from fidellm.train.checkpoint import latest_checkpoint
from fidellm.train.curriculum import DEFAULT_SPAN
from fidellm.train.loop import train

ARMS = ("shuffled", "curriculum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    add_training_options(parser)
    parser.set_defaults(preset="tiny", steps=300, batch_size=8, seq_len=256, lr=3e-3, warmup=20,
                        dropout=0.0, eval_every=100, compile=False)  # fmt: skip
    parser.add_argument(
        "--seeds", default="0,1", help="Comma-separated seeds; each arm trains once per seed."
    )
    parser.add_argument("--span", type=float, default=DEFAULT_SPAN, help="--curriculum-span of the arm.")
    parser.add_argument("--workers", type=int, default=2, help="Tokenizing processes.")
    parser.add_argument("--out", type=Path, default=Path("runs/curriculum"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    scored_run = prepare_tokens(args.run, args.out, args.workers)
    tokenizer = load_tokenizer(scored_run / "tokenizer")
    flores = flores_lines(resolve_data_dir(args.data_dir))
    test_texts = [doc.text for path in split_files(scored_run, "test") for doc in read_split_file(path)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in ARMS:
            args.seed = seed
            config = config_from_args(args)
            if arm == "curriculum":  # the shuffled arm has no span: it would not take effect
                config = dataclasses.replace(config, curriculum=True, curriculum_span=args.span)
            work = training_workdir(scored_run, args.out / f"{arm}-s{seed}")
            started = time.perf_counter()
            summary = train(work, config)
            seconds = time.perf_counter() - started
            model = load_checkpoint_model(latest_checkpoint(work / "train" / "checkpoints"), device)
            row = {
                "arm": arm,
                "seed": seed,
                "train_tokens": config.max_steps * config.batch_size * config.seq_len,
                "train_seconds": round(seconds, 1),
                "val_loss": summary["val_loss"],
                "val_bpb": summary["val_bpb"],
                "flores": dataclasses.asdict(score_lines(model, tokenizer, flores, device)),
                "heldout": dataclasses.asdict(score_documents(model, tokenizer, test_texts, device)),
            }
            results.append(row)
            print(json.dumps({k: row[k] for k in ("arm", "seed", "val_loss", "train_seconds")}), flush=True)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "commit": git_commit(),
        "machine": torch.cuda.get_device_name() if device == "cuda" else machine_description(),
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(results))


def prepare_tokens(run: Path, out: Path, workers: int) -> Path:
    """OUT as a run with RUN's splits and tokenizer (symlinked) and its own shards with complexity scores."""
    for name in ("data", "tokenizer"):
        if not (out / name).exists():
            (out / name).symlink_to((run / name).resolve())
    if not (out / "tokens" / "train" / COMPLEXITY_FILE).is_file():
        tokenize_splits(out, workers=workers, curriculum=True)
    return out


def markdown_table(results: list[dict]) -> str:
    """One row per arm and seed, then the mean of each arm."""
    lines = [
        "| arm | seed | val loss | val bits/byte | FLORES second-half bits | FLORES bits/byte |"
        " held-out test bits/byte | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    metrics = (
        lambda r: r["val_loss"],
        lambda r: r["val_bpb"],
        lambda r: r["flores"]["second_half_bits"],
        lambda r: r["flores"]["bits_per_byte"],
        lambda r: r["heldout"]["bits_per_byte"],
    )
    for row in results:
        values = " | ".join(f"{metric(row):.4f}" for metric in metrics)
        lines.append(f"| {row['arm']} | {row['seed']} | {values} | {row['train_seconds']:.0f} |")
    for arm in ARMS:
        rows = [row for row in results if row["arm"] == arm]
        means = " | ".join(f"{statistics.mean(metric(r) for r in rows):.4f}" for metric in metrics)
        lines.append(f"| **{arm}, mean** | {len(rows)} seeds | {means} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
