"""The design notes' experiment: H-Net vs the BPE Llama on the same text, compute per byte matched.

Usage: python benchmarks/hnet_vs_llama.py BPE_RUN BYTE_RUN [--llama-preset 25m] [--hnet-preset hnet-small]
       [--epochs 10] [--llama-batch 64] [--llama-seq 1024] [--hnet-batch 32] [--hnet-seq 4096]
       [--data-dir DIR] [--out runs/hnet_vs_llama]
BPE_RUN and BYTE_RUN hold the same prepared splits, tokenized with the BPE and with the byte tokenizer
(`fidellm tokenizer train RUN --kind bytes`, `fidellm data tokenize RUN`). Both models train for the
same number of epochs over the same text, so they see the same bytes; the table reports each one's
estimated training FLOPs per byte (6·N per token for the Llama spread over its bytes/token; for the
H-Net 6·N_outer per byte plus 6·N_inner per chunk, from the achieved bytes per chunk), wall time,
FLORES second-half bits and bits/byte (best-validation weights) and the H-Net's bytes per chunk.
Pick presets whose FLOPs per byte are close (the script prints them before training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import git_commit, training_workdir
from quality_run import summary_line, train_and_score

from fidellm.models.factory import build_model, preset_config
from fidellm.train.config import TrainConfig


def steps_for(run: Path, epochs: float, batch: int, seq: int) -> int:
    tokens = json.loads((run / "tokens" / "train" / "meta.json").read_text())["n_tokens"]
    return max(1, round(epochs * tokens / (batch * seq)))


def flops_per_byte_llama(preset: str, run: Path) -> float:
    meta = json.loads((run / "tokens" / "train" / "meta.json").read_text())
    config = preset_config("llama", preset, meta["vocab_size"], 2048, {})
    model = build_model(config)
    n = model.num_parameters(exclude_embeddings=True) + model.lm_head.weight.numel()
    report = (
        json.loads((run / "tokenizer" / "report.json").read_text())
        if (run / "tokenizer/report.json").is_file()
        else None
    )
    bytes_per_token = report["measured"][0]["bytes_per_token"] if report else 7.8
    return 6.0 * n / bytes_per_token


def flops_per_byte_hnet(preset: str, bytes_per_chunk: float) -> float:
    model = build_model(preset_config("hnet", preset, 256, 8192, {}))
    inner = sum(p.numel() for name, p in model.named_parameters() if ".main_network." in name)
    outer = model.num_parameters(exclude_embeddings=True) - inner
    return 6.0 * outer + 6.0 * inner / max(bytes_per_chunk, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_run", type=Path)
    parser.add_argument("byte_run", type=Path)
    parser.add_argument("--llama-preset", default="25m")
    parser.add_argument("--hnet-preset", default="hnet-small")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--llama-batch", type=int, default=64)
    parser.add_argument("--llama-seq", type=int, default=1024)
    parser.add_argument("--hnet-batch", type=int, default=32)
    parser.add_argument("--hnet-seq", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/hnet_vs_llama"))
    args = parser.parse_args()

    common = {"lr": args.lr, "warmup_steps": 100, "compile": args.compile, "save_every": 0, "keep_last": 1,
              "resume": False}  # fmt: skip
    llama_steps = steps_for(args.bpe_run, args.epochs, args.llama_batch, args.llama_seq)
    hnet_steps = steps_for(args.byte_run, args.epochs, args.hnet_batch, args.hnet_seq)
    runs = {
        "llama": (args.bpe_run, TrainConfig(arch="llama", preset=args.llama_preset, seq_len=args.llama_seq,
                  batch_size=args.llama_batch, max_steps=llama_steps, eval_every=max(1, llama_steps // 10),
                  model_overrides={"dropout": 0.1}, **common)),
        "hnet": (args.byte_run, TrainConfig(arch="hnet", preset=args.hnet_preset, seq_len=args.hnet_seq,
                 batch_size=args.hnet_batch, max_steps=hnet_steps, eval_every=max(1, hnet_steps // 10),
                 stage_lr_multipliers=[2.0, 1.0], **common)),
    }  # fmt: skip
    llama_fpb = flops_per_byte_llama(args.llama_preset, args.bpe_run)
    print(f"Llama {args.llama_preset}: ≈{llama_fpb:.3g} training FLOPs/byte; H-Net {args.hnet_preset}:"
          f" ≈{flops_per_byte_hnet(args.hnet_preset, 6.0):.3g} at 6 bytes/chunk", flush=True)  # fmt: skip
    rows = []
    for name, (run, config) in runs.items():
        work = training_workdir(run, args.out / name)
        result = train_and_score(work, config, args.data_dir)
        records = [json.loads(line) for line in (work / "train/metrics.jsonl").read_text().splitlines()]
        chunks = [r["bytes_per_chunk"][0] for r in records if r.get("bytes_per_chunk")]
        result["bytes_per_chunk"] = chunks[-1] if chunks else None
        result["flops_per_byte"] = (
            llama_fpb if name == "llama" else flops_per_byte_hnet(args.hnet_preset, chunks[-1])
        )
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"{name}: {summary_line(result)}", flush=True)
        rows.append((name, config.preset, result))
    header = "| model | preset | params | FLOPs/byte | train s | FLORES bits | bits/byte | bytes/chunk |"
    table = [header, "|---|---|---|---|---|---|---|---|"]
    for name, preset, r in rows:
        chunk = "–" if r["bytes_per_chunk"] is None else f"{r['bytes_per_chunk']:.2f}"
        flores = r["flores"]
        table.append(
            f"| {name} | {preset} | {r['parameters'] / 1e6:.1f}M | {r['flops_per_byte']:.3g}"
            f" | {r['train_seconds']:.0f} | {flores['second_half_bits']:.2f} | {flores['bits_per_byte']:.4f}"
            f" | {chunk} |"
        )
    table.append(f"\ncommit {git_commit()}, {rows[0][2]['device']}, {args.epochs:g} epochs")
    (args.out / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
