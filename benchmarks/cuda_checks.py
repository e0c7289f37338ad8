"""Checks of the CUDA-only paths of the training engine, run first in a GPU session (CI has no GPU).

Usage: python benchmarks/cuda_checks.py RUN [--preset 25m] [--steps 12] [--out DIR]
RUN holds tokens/ and tokenizer/ (the carried demo run). Each check trains a few steps of `--preset` at
seq 256, batch 8, bf16, on the GPU, and prints PASS or FAIL with its numbers; the exit status is the
number of failures. Checks: the sync-free loop (fused AdamW skipping on the device, losses read a step
late through pinned memory) against the checked loop; a NaN step stopping with the weights of a clean
stop before it; the chunked loss against materialized logits under torch.compile; document masking,
CUDA graphs (compile mode reduce-overhead) and Muon (`--optimizer muon`) training without error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from common import training_workdir
from safetensors.torch import load_file

from fidellm.errors import FidelError
from fidellm.models.llama import LlamaForCausalLM
from fidellm.train import loop
from fidellm.train.config import TrainConfig
from fidellm.train.loop import train

FAILURES: list[str] = []


def check(name: str, passed: bool, detail: str) -> None:
    print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)
    if not passed:
        FAILURES.append(name)


def run_dir(args: argparse.Namespace, name: str) -> Path:
    target = args.out / name
    shutil.rmtree(target, ignore_errors=True)
    return training_workdir(args.run, target)


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b, strict=True))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--preset", default="25m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cuda_checks"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_checks.py needs a CUDA GPU")
    base = TrainConfig(
        preset=args.preset, seq_len=256, batch_size=8, grad_accum=2, max_steps=args.steps, warmup_steps=2,
        lr=1e-3, eval_every=args.steps, eval_batches=2, log_every=2, save_every=0, device=args.device,
        dtype="bf16", echo=False,
    )  # fmt: skip

    checked_devices = ("none",)
    sync_free = train(run_dir(args, "sync-free"), base)
    original_devices, loop.SYNC_FREE_DEVICES = loop.SYNC_FREE_DEVICES, checked_devices
    checked = train(run_dir(args, "checked"), base)
    loop.SYNC_FREE_DEVICES = original_devices
    check(
        "sync-free loop = checked loop",
        close(sync_free["losses"], checked["losses"], 1e-3),
        f"last losses {sync_free['losses'][-1]:.5f} vs {checked['losses'][-1]:.5f}",
    )

    stop_at = args.steps // 2
    clean = train(run_dir(args, "clean"), dataclasses.replace(base, stop_at_step=stop_at - 1))
    poisoned_run = run_dir(args, "poisoned")
    original_forward = LlamaForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self: LlamaForCausalLM, *inputs: Any, **options: Any) -> Any:
        output = original_forward(self, *inputs, **options)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (2 * stop_at - 1, 2 * stop_at):  # both micro-batches of step stop_at
                output.loss = output.loss * float("nan")
        return output

    LlamaForCausalLM.forward = poisoned  # type: ignore[method-assign]
    try:
        train(poisoned_run, base)
        check("NaN step stops the run", False, "training finished")
    except FidelError as error:
        saved = poisoned_run / "train/checkpoints" / f"step_{stop_at - 1:08d}"
        ours, theirs = weights(saved) if saved.is_dir() else {}, weights(Path(clean["checkpoint"]))
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        check("NaN step stops the run", f"at step {stop_at}" in str(error) and same, str(error)[:160])
    finally:
        LlamaForCausalLM.forward = original_forward  # type: ignore[method-assign]

    compiled = dataclasses.replace(base, compile=True)
    fused = train(run_dir(args, "compiled-chunked"), compiled)
    full = train(run_dir(args, "compiled-full"), dataclasses.replace(compiled, loss_chunk=0))
    check(
        "chunked loss = materialized logits (bf16, compiled)",
        close(fused["losses"], full["losses"], 2e-2),
        f"last losses {fused['losses'][-1]:.5f} vs {full['losses'][-1]:.5f}",
    )
    masked = train(run_dir(args, "document-mask"), dataclasses.replace(compiled, document_mask=True))
    check(
        "document mask trains (compiled)", math.isfinite(masked["losses"][-1]), f"{masked['losses'][-1]:.5f}"
    )
    graphs = train(
        run_dir(args, "cuda-graphs"), dataclasses.replace(compiled, compile_mode="reduce-overhead")
    )
    check(
        "CUDA graphs (reduce-overhead) train like default compile",
        close(graphs["losses"], fused["losses"], 2e-2),
        f"last losses {graphs['losses'][-1]:.5f} vs {fused['losses'][-1]:.5f}",
    )
    muon = train(run_dir(args, "muon"), dataclasses.replace(compiled, optimizer="muon"))
    check(
        "Muon trains (bf16 Newton-Schulz, compiled)",
        all(map(math.isfinite, muon["losses"])) and muon["losses"][-1] < muon["losses"][0],
        f"losses {muon['losses'][0]:.5f} -> {muon['losses'][-1]:.5f} (AdamW: -> {fused['losses'][-1]:.5f})",
    )
    print(f"{len(FAILURES)} failed: {', '.join(FAILURES) or 'none'}", flush=True)
    sys.exit(len(FAILURES))


if __name__ == "__main__":
    main()
