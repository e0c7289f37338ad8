"""A quality run: train a preset on a prepared run's shards, then score FLORES amh second-half bits.

Usage: python benchmarks/quality_run.py RUN --preset 25m --steps 2400 [--batch-size 64] [--seq-len 1024]
       [--lr 2e-3] [--optimizer muon] [--dropout 0.1] [--eval-every 240] [--data-dir DIR] [--out runs/quality]
RUN holds tokens/ and tokenizer/; DIR holds flores200/amh_Ethi.{dev,devtest} (default: the data dir).
Prints the validation curve's best step and the FLORES scores (evaluation.md) of the best-validation
weights (RUN/train/best: lowest val loss, or with --best-by-sources lowest bits/byte over those sources'
val text) and of the final checkpoint, and writes them, with each source's val curve, to OUT/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import training_workdir

from fidellm.eval.lm import score_lines
from fidellm.models.load import load_checkpoint_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.report import flores_lines
from fidellm.train.checkpoint import latest_checkpoint
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    add_training_options(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = parser.parse_args()

    name = (
        f"{args.preset}-lr{args.lr:g}-do{args.dropout:g}-wd{args.weight_decay:g}-s{args.steps}"
        f"-{args.schedule}{args.min_lr_ratio:g}"
        f"{f'-decay{args.decay_fraction:g}' if args.schedule == 'wsd' else ''}"
        f"{'-docmask' if args.document_mask else ''}-seed{args.seed}"
        f"{'-bestby-' + args.best_by_sources.replace(',', '+') if args.best_by_sources else ''}"
        f"{f'-ema{args.ema_decay:g}' if args.ema_decay else ''}"
        f"{'-muon' if args.optimizer == 'muon' else ''}"
    )
    work = training_workdir(args.run, args.out / name)
    result = train_and_score(work, config_from_args(args), args.data_dir)
    result = {"name": name, "args": {k: str(v) for k, v in vars(args).items()}, **result}
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"{name}: {summary_line(result)}", flush=True)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The training options every quality experiment takes (defaults: the 25m recipe)."""
    parser.add_argument("--arch", choices=["llama", "hnet"], default="llama")
    parser.add_argument("--preset", default="25m")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--optimizer", choices=["adamw", "muon"], default="adamw", help="muon: Muon on the hidden matrices."
    )
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    parser.add_argument("--document-mask", action="store_true", help="Attention within documents only.")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="Final lr / peak lr.")
    parser.add_argument(
        "--decay-fraction",
        type=float,
        default=TrainConfig.decay_fraction,
        help="--schedule wsd only: the share of steps decaying (0: constant).",
    )
    parser.add_argument("--eval-every", type=int, default=240)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0, help="Initialisation, dropout and data order.")
    parser.add_argument(
        "--best-by-sources",
        default="",
        help="Comma-separated sources whose val bits/byte choose train/best (default: the val loss).",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="Keep an average of the weights (fidellm.train.average); the final step is then scored both"
        " averaged and as trained.",
    )
    parser.add_argument("--data-dir", type=Path, default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the options (a --decay-fraction other than the default needs --schedule wsd)."""
    return TrainConfig(
        arch=args.arch,
        preset=args.preset,
        model_overrides={"dropout": args.dropout} if args.dropout and args.arch == "llama" else {},
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        warmup_steps=args.warmup,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        document_mask=args.document_mask,
        min_lr_ratio=args.min_lr_ratio,
        decay_fraction=args.decay_fraction,
        compile=args.compile,
        eval_every=args.eval_every,
        seed=args.seed,
        best_by_sources=[name for name in args.best_by_sources.split(",") if name],
        ema_decay=args.ema_decay,
        save_every=0,
        keep_last=1,
        resume=False,
    )


def train_and_score(work: Path, config: TrainConfig, data_dir: Path | None) -> dict:
    """Train `config` in `work` (tokens + tokenizer there), then score FLORES with the best-validation
    weights and with the final step; returns the measurements."""
    start = time.perf_counter()
    summary = train(work, config)
    train_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    val = [
        (r["step"], r["val_loss"], r["val_bpb"], r.get("val_bpb_by_source", {}))
        for r in records
        if r.get("kind") == "val"
    ]
    best = summary["best"]  # the lowest val loss, or bits/byte over --best-by-sources

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(work / "tokenizer")
    lines = flores_lines(resolve_data_dir(data_dir))
    final = latest_checkpoint(work / "train" / "checkpoints")
    final_scores = score_lines(load_checkpoint_model(final, device), tokenizer, lines, device)
    trained_scores = None  # with a weight average, the final step's own weights too
    if config.ema_decay:
        trained = load_checkpoint_model(final, device, averaged=False)
        trained_scores = dataclasses.asdict(score_lines(trained, tokenizer, lines, device))
    scores = score_lines(load_checkpoint_model(work / "train" / "best", device), tokenizer, lines, device)
    return {
        "parameters": summary["parameters"],
        "train_tokens": json.loads((work / "tokens" / "train" / "meta.json").read_text())["n_tokens"],
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": summary["tokens_per_s"],
        "final_val_loss": summary.get("val_loss"),
        "final_val_bpb": summary.get("val_bpb"),
        "best_val": {key: best[key] for key in ("step", "val_loss", "val_bpb", "score")},
        "best_by_sources": config.best_by_sources,
        "val_curve": val,
        "flores": dataclasses.asdict(scores),  # the best-validation weights (train/best)
        "flores_final_step": dataclasses.asdict(final_scores),  # averaged when ema_decay is set
        "ema_decay": config.ema_decay,
        "flores_final_step_trained": trained_scores,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def summary_line(result: dict) -> str:
    best, flores = result["best_val"], result["flores"]
    return (
        f"{result['parameters']:,} params, {result['train_seconds']:.0f} s;"
        f" val loss {result['final_val_loss']:.4f} (best {best['val_loss']:.4f} at step {best['step']});"
        f" FLORES second-half bits {flores['second_half_bits']:.2f} (best-validation weights; final step"
        f" {result['flores_final_step']['second_half_bits']:.2f}), bits/byte {flores['bits_per_byte']:.4f}"
        + (
            f"; final step as trained, without the average: {trained['second_half_bits']:.2f}"
            if (trained := result.get("flores_final_step_trained"))
            else ""
        )
    )


if __name__ == "__main__":
    main()
