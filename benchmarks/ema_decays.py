"""Weight averages at several decays from one training run, each scored on FLORES against the final step.

Usage: python benchmarks/ema_decays.py RUN --decays 0.98,0.99,0.995 [training options of quality_run.py]
       [--out runs/ema]
RUN holds tokens/ and tokenizer/. An average never changes training (tests/test_weight_average.py), so
one run can keep several: each decay gets a `fidellm.train.average.WeightAverage`, updated after every
optimizer step (the loop's `optimizer_update` is wrapped; the loop's own average, `--ema-decay`, does the
same on the host's word that the step was finite). Prints and writes to OUT/<name>.json the FLORES amh
second-half bits (evaluation.md) of the final step's weights and of each average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import git_commit, machine_description, training_workdir
from quality_run import add_training_options, config_from_args

from fidellm.eval.lm import score_lines
from fidellm.models.load import load_checkpoint_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.report import flores_lines
from fidellm.train import loop
from fidellm.train.average import WeightAverage
from fidellm.train.checkpoint import latest_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--decays", default="0.98,0.99,0.995")
    add_training_options(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/ema"))
    args = parser.parse_args()
    decays = [float(d) for d in args.decays.split(",")]
    config = config_from_args(args)
    if config.ema_decay:
        raise SystemExit("--ema-decay: this benchmark keeps its own averages (--decays)")
    name = (
        f"{args.preset}-{args.schedule}{args.min_lr_ratio:g}"
        f"{f'-decay{args.decay_fraction:g}' if args.schedule == 'wsd' else ''}-s{args.steps}-seed{args.seed}"
        f"{'-muon' if args.optimizer == 'muon' else ''}"
    )
    work = training_workdir(args.run, args.out / name)

    averages: list[WeightAverage] = []
    steps = [0]
    update = loop.optimizer_update

    def update_and_average(model: torch.nn.Module, *rest, **options) -> torch.Tensor:
        norm = update(model, *rest, **options)
        if not averages:
            averages.extend(WeightAverage(model, decay) for decay in decays)
        steps[0] += 1
        for average in averages:
            average.update(steps[0])
        return norm

    loop.optimizer_update = update_and_average
    start = time.perf_counter()
    summary = loop.train(work, config)
    seconds = time.perf_counter() - start

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(work / "tokenizer")
    lines = flores_lines(resolve_data_dir(args.data_dir))
    model = load_checkpoint_model(latest_checkpoint(work / "train" / "checkpoints"), device)
    flores = {"final step": dataclasses.asdict(score_lines(model, tokenizer, lines, device))}
    trainable = [p for p in model.parameters() if p.requires_grad]  # the order the averages keep
    for average in averages:
        with torch.no_grad():
            for param, averaged in zip(trainable, average.shadow, strict=True):
                param.copy_(averaged)
        flores[f"ema {average.decay:g}"] = dataclasses.asdict(score_lines(model, tokenizer, lines, device))
    result = {
        "name": name,
        "args": {k: str(v) for k, v in vars(args).items()},
        "steps": summary["step"],
        "train_seconds": round(seconds, 1),
        "final_val_loss": summary.get("val_loss"),
        "flores": flores,
        "commit": git_commit(),
        "machine": machine_description(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(name, {k: round(v["second_half_bits"], 2) for k, v in flores.items()}, flush=True)


if __name__ == "__main__":
    main()
