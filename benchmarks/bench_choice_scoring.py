"""Time of label-likelihood scoring (`fidellm.eval.downstream.likelihood.score_choices`) on the real
SIB-200 and AfriSenti test sets, 0- and 5-shot, with a trained run's model, median of repeats; also the
predictions' checksum, so a faster scorer can be checked to predict exactly the same labels.

Usage: python benchmarks/bench_choice_scoring.py RUN [--repeats 3]   (reads $FIDELLM_DATA)
"""

from __future__ import annotations

import argparse
import sys
import time

from common import markdown_row

from fidellm.eval.downstream import sib
from fidellm.eval.downstream.likelihood import model_context, score_choices
from fidellm.models.load import load_model
from fidellm.tokenizer.base import load_tokenizer

CASES = ((sib.SIB_TASK, 0), (sib.SIB_TASK, 5), (sib.AFRISENTI_TASK, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer_dir = load_model(args.run)
    tokenizer = load_tokenizer(tokenizer_dir)
    model.eval()
    for name, shots in CASES:
        task, splits = sib.load_choice_task(name), sib.task_splits(name, None)
        prompts, _ = sib.build_prompts(
            task, tokenizer, splits["test"], splits["train"], shots, sib.DEFAULT_SEED, model_context(model)
        )
        seconds, predicted = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            scores = score_choices(model, tokenizer, prompts, task.choices, task.target_delimiter)
            seconds.append(time.perf_counter() - started)
            predicted = scores.raw
        size = f"{len(prompts)} items × {len(task.choices)} choices"
        what = f"{name} {shots}-shot: {size}, argmax sum {sum(predicted)}"
        print(markdown_row(what, " ".join(["python", *sys.argv]), seconds, "s"), flush=True)


if __name__ == "__main__":
    main()
