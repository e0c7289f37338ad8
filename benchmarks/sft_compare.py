"""Full fine-tune vs LoRA vs QLoRA (and LoRA with the curriculum order) on the same chat data: quality
(assistant-token validation loss, optionally chat evaluation tasks), peak memory, time and trainable
parameters.

Each arm runs `fidellm.train.loop.train` in its own subprocess (same base, data, seed, batch, sequence
length and steps), so its peak memory is its own: peak RSS on CPU, `torch.cuda.max_memory_allocated`
on CUDA. Every setting the benchmark does not fix takes `fidellm sft`'s default (`train_config`): weight
decay 0 (not TrainConfig's 0.1, the pretraining default), its betas and clipping, its LoRA rank, alpha,
dropout and targets, so an arm measures what a user's `fidellm sft` run trains. QLoRA needs
bitsandbytes (`pip install 'fidel-lm[qlora]'`); without it the arm is skipped and the output says so.

    python benchmarks/sft_compare.py RUN --base MODEL [--steps 60] [--device auto] [--optimizer adamw]
        [--eval-tasks ...]

RUN holds RUN/chat/{train,eval}.jsonl (`fidellm data chat RUN`); MODEL is any model `fidellm sft
--base` takes. Writes OUT/sft_compare.json and prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import machine_description

from fidellm.eval.results import git_commit

if TYPE_CHECKING:
    from fidellm.train.config import TrainConfig

ARMS: dict[str, dict[str, Any] | None] = {  # None: full fine-tuning; a dict: LoRA with these extras
    "full": None,
    "lora": {},
    "qlora": {"quantize": "nf4"},
    "lora-curriculum": {"curriculum": True},
}

CHILD = textwrap.dedent(
    """
    import json, resource, shutil, sys, time
    from pathlib import Path
    import torch
    args = json.loads(sys.argv[1])
    sys.path.insert(0, args["benchmarks"])
    from sft_compare import train_config
    from fidellm.sft.cli import prepare_output
    from fidellm.train.loop import train
    prepare_output(Path(args["out"]), args["base"])
    config = train_config(args)
    shutil.rmtree(Path(args["out"]) / "train", ignore_errors=True)  # a fresh arm every time
    started = time.perf_counter()
    summary = train(Path(args["out"]), config)
    cuda = torch.cuda.is_available() and args["device"] != "cpu"
    print("RESULT " + json.dumps({
        "seconds": time.perf_counter() - started,
        "tokens_per_s": summary["tokens_per_s"],
        "val_loss": summary.get("val_loss"),
        "train_loss_last": summary["losses"][-1],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }))
    """
)


def train_config(args: dict[str, Any]) -> TrainConfig:
    """An arm's TrainConfig: the `fidellm sft` command's default for every setting it has (weight decay,
    betas, clipping, LoRA shape, ...), then what the benchmark fixes for all arms (steps, batch, length,
    lr, warmup, evaluation, seed) and the arm's LoRA quantization and curriculum."""
    from fidellm.sft.cli import sft_command
    from fidellm.sft.lora import lora_spec
    from fidellm.train.config import TrainConfig

    cli = {param.name: param.default for param in sft_command.params}
    lora = args["lora"]
    spec = None
    if lora is not None:
        dimensions = (cli["lora_rank"], cli["lora_alpha"], cli["lora_targets"], cli["lora_dropout"])
        spec = lora_spec(*dimensions, quantize=lora.get("quantize"))
    steps = args["steps"]
    fixed = {
        "data": "chat", "chat_dir": args["chat_dir"], "base": args["base"], "lora": spec,
        "max_steps": steps, "epochs": None, "batch_size": args["batch_size"], "seq_len": args["seq_len"],
        "lr": args["lr"], "warmup_steps": args["warmup"], "eval_every": steps,
        "eval_batches": args["eval_batches"], "log_every": max(1, steps // 5), "save_every": 0,
        "device": args["device"], "seed": args["seed"], "resume": False, "echo": False,
        "curriculum": bool(lora and lora.get("curriculum")), "optimizer": args["optimizer"],
    }  # fmt: skip
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    defaults = {name: cli[name] for name in names & cli.keys()}
    return TrainConfig(**{**defaults, **fixed})


def run_arm(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    payload = {
        "benchmarks": str(Path(__file__).resolve().parent),
        "lora": ARMS[name],
        "out": str(out / name),
        "base": args.base,
        "chat_dir": str((args.run / "chat").resolve()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr_full if name == "full" else args.lr_lora,
        "warmup": max(1, args.steps // 10),
        "eval_batches": args.eval_batches,
        "device": args.device,
        "seed": args.seed,
        "optimizer": args.optimizer,
    }
    process = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, check=False
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        return {"error": (process.stderr or process.stdout).strip().splitlines()[-1:]}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["trainable"] = trainable_parameters(out / name, ARMS[name] is not None)
    if args.eval_tasks:
        result["eval"] = evaluate(out / name, args, ARMS[name] is not None)
    return result


def trainable_parameters(output: Path, lora: bool) -> int:
    """Parameters the optimizer updated: the LoRA matrices of the checkpoint, or every weight."""
    from safetensors import safe_open

    checkpoint = sorted((output / "train" / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        names = list(handle.keys())
        return sum(_numel(handle.get_slice(n).get_shape()) for n in names if not lora or ".lora_" in n)


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def evaluate(output: Path, args: argparse.Namespace, lora: bool) -> dict[str, Any]:
    """The chat tasks on the arm's model (merged first for LoRA arms)."""
    model = output
    if lora:
        from fidellm.sft.lora import merge_run

        model = merge_run(output)
    target = output / "eval"
    command = [
        sys.executable, "-m", "fidellm.cli", "eval", str(model), "--tasks", args.eval_tasks,
        "--limit", str(args.eval_limit), "--device", args.device, "--out", str(target),
        "--chat-dir", str((args.run / "chat").resolve()),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    results = json.loads((target / "results.json").read_text(encoding="utf-8"))
    return {f"{r['task']}/{r['metric']}/{r['split']}": r["value"] for r in results["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/sft-compare"))
    parser.add_argument("--arms", default="full,lora,qlora")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=2e-4)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="every arm's")
    parser.add_argument("--eval-tasks", default="", help="e.g. translation,tool-calls (slow on CPU)")
    parser.add_argument("--eval-limit", type=int, default=20)
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    results: dict[str, Any] = {}
    for name in args.arms.split(","):
        if name == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                results[name] = {"error": ["bitsandbytes is not installed"]}
                continue
        started = time.perf_counter()
        results[name] = run_arm(name, args, args.out)
        print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    record = {"commit": git_commit(), "machine": machine_description(), "command": command, "arms": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sft_compare.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"\ncommit {record['commit']}, {record['machine']}, `{command}`\n")
    print("| arm | val loss (assistant tokens) | last train loss | trainable | peak memory | time | tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {' '.join(r['error'])} | | | | | |")
            continue
        memory = r["peak_cuda_mib"] if r["peak_cuda_mib"] is not None else r["peak_rss_mib"]
        kind = "CUDA" if r["peak_cuda_mib"] is not None else "RSS"
        print(
            f"| {name} | {r['val_loss']:.4f} | {r['train_loss_last']:.4f} | {r['trainable']:,} |"
            f" {memory:,.0f} MiB {kind} | {r['seconds']:.0f} s | {r['tokens_per_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()
