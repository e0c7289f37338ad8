"""What each source contributes: retrain with a source left out (or up-weighted) and score FLORES.

Usage: python benchmarks/source_contribution.py RUN [--experiment NAME=SOURCE=W[,SOURCE=W...]]...
       [--leave-out SOURCE,SOURCE...] [--workers 16] [training options of quality_run.py]
       [--out runs/sources]
RUN holds data/splits and tokenizer/ (a prepared and tokenized run). Every experiment re-tokenizes the
train split with its source weights (`fidellm data tokenize --source-weight`; val and test stay
identical, so validation losses compare), trains the same recipe and scores FLORES amh second-half
bits with the best-validation weights. The baseline ("all", registry weights) always runs first;
`--leave-out a,b` adds one experiment per source with its weight 0, and `--baseline-repeats N` reruns
the baseline with other seeds so that the noise of one run is known. Results: OUT/<name>.json per
experiment and OUT/summary.md, a table of train tokens, best validation loss and FLORES bits with
the difference from the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from common import git_commit, machine_description, training_workdir
from quality_run import add_training_options, config_from_args, summary_line, train_and_score

from fidellm.tokenizer.shards import tokenize_splits


def parse_experiment(text: str) -> tuple[str, dict[str, float]]:
    """ "name=src=w,src2=w" -> ("name", {src: w, src2: w})."""
    name, _, spec = text.partition("=")
    weights = {}
    for item in filter(None, spec.split(",")):
        source, _, value = item.partition("=")
        weights[source] = float(value)
    if not name or not weights:
        raise SystemExit(f"--experiment {text!r}: expected NAME=SOURCE=WEIGHT[,SOURCE=WEIGHT...]")
    return name, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--experiment", action="append", default=[], help="NAME=SOURCE=W[,SOURCE=W...]")
    parser.add_argument("--leave-out", default="", help="Comma-separated sources, one experiment each.")
    parser.add_argument(
        "--baseline-repeats",
        type=int,
        default=2,
        help="Baseline runs with seeds 0..N-1: their spread is the noise any difference must beat.",
    )
    parser.add_argument("--workers", type=int, default=2, help="Tokenizer processes per re-tokenization.")
    add_training_options(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/sources"))
    args = parser.parse_args()

    experiments: list[tuple[str, dict[str, float]]] = [("all", {})]
    experiments += [(f"all-seed{seed}", {}) for seed in range(1, args.baseline_repeats)]
    experiments += [(f"without-{s}", {s: 0.0}) for s in filter(None, args.leave_out.split(","))]
    experiments += [parse_experiment(text) for text in args.experiment]
    results = []
    for name, weights in experiments:
        seed = int(name.removeprefix("all-seed")) if name.startswith("all-seed") else args.seed
        config = dataclasses.replace(config_from_args(args), seed=seed)
        work = training_workdir(args.run, args.out / name, shared=("data", "tokenizer"))  # own tokens/
        tokenize_splits(work, workers=args.workers, splits=("train", "val"), source_weights=weights)
        result = {"name": name, "source_weights": weights, "seed": seed}
        result.update(train_and_score(work, config, args.data_dir))
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"{name}: {summary_line(result)}", flush=True)
        results.append(result)

    base = results[0]
    rows = [
        f"Source contribution, {args.preset}, {args.steps} steps × {args.batch_size} × {args.seq_len},"
        f" lr {args.lr:g}, dropout {args.dropout:g}; commit {git_commit()}; {base['device']};"
        f" {machine_description()}",
        "",
        "| experiment | train tokens | best val loss | FLORES second-half bits | Δ bits vs all |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        bits = result["flores"]["second_half_bits"]
        rows.append(
            f"| {result['name']} | {result['train_tokens']:,} | {result['best_val']['val_loss']:.4f}"
            f" | {bits:.2f} | {bits - base['flores']['second_half_bits']:+.2f} |"
        )
    (args.out / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
