"""Whether FSDP2 over CPU processes (gloo) trains like one process with the installed torch: 6 steps of the
tiny preset, once in one process (batch 8) and once under torchrun with 2 processes × 4 and
`--strategy fsdp`, printing both runs' gradient norms and losses per step. `fidellm.compat.FSDP_ON_CPU`
(torch 2.9) comes from this check: older releases fail, or sum the ranks' gradients (twice the norm).

Usage: python benchmarks/fsdp_cpu_check.py RUN   (a run with tokens and a tokenizer, e.g. runs/demo;
       bypasses the version check through FIDELLM_ALLOW_CPU_FSDP=1, so older torch releases show what they do)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine_description, training_workdir

from fidellm.eval.results import git_commit

TRAIN = ["--preset", "tiny", "--seq-len", "64", "--steps", "6", "--warmup", "2", "--lr", "3e-3",
         "--eval-every", "100", "--log-every", "1", "--device", "cpu"]  # fmt: skip


def steps(run: Path) -> list[dict]:
    """The train records of RUN/train/metrics.jsonl."""
    lines = (run / "train" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FIDELLM_ALLOW_CPU_FSDP": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        single = training_workdir(args.run, Path(tmp) / "single")
        sharded = training_workdir(args.run, Path(tmp) / "fsdp")
        fidellm = [sys.executable, "-m", "fidellm", "train"]
        subprocess.run([*fidellm, str(single), *TRAIN, "--batch-size", "8"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        done = subprocess.run([*launch, "-m", "fidellm", "train", str(sharded), *TRAIN, "--batch-size", "4",
                               "--strategy", "fsdp"], env=env, capture_output=True, text=True)  # fmt: skip
        print(f"torch {torch.__version__}, commit {git_commit()}, {machine_description()}")
        if done.returncode:
            print(f"FSDP on CPU failed (exit {done.returncode}):\n{done.stderr[-1500:]}")
            return
        print("| step | grad norm, 1 process | grad norm, 2 × FSDP | loss, 1 process | loss, 2 × FSDP |")
        print("|---|---|---|---|---|")
        for one, two in zip(steps(single), steps(sharded), strict=True):
            print(f"| {one['step']} | {one['grad_norm']:.6f} | {two['grad_norm']:.6f} | {one['loss']:.6f} |"
                  f" {two['loss']:.6f} |")  # fmt: skip


if __name__ == "__main__":
    main()
