"""What each `fidellm export gguf --type` costs a trained model, measured in llama.cpp itself: the file size,
and FLORES second-half bits (the Goldfish rule of `fidellm.eval.lm.score_lines`) and bits/byte from
llama.cpp's own logits on FLORES amh dev + devtest; our PyTorch model's figures are the reference row.

Usage: python benchmarks/gguf_types.py RUN [--types f32,f16,q8_0,q5_1,q5_0,q4_1,q4_0] [--threads 2]
Needs llama-cpp-python (`make test-gguf` installs it; it builds from source).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import llama_cpp_model, machine_description

from fidellm.eval.lm import score_lines
from fidellm.eval.results import git_commit
from fidellm.export.gguf import export_gguf
from fidellm.models.load import load_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.report import flores_lines, run_normalization


def llama_cpp_scores(
    path: Path, sequences: list[list[int]], cuts: list[int], threads: int
) -> tuple[float, float]:
    """(mean second-half bits, total bits) of `sequences` (BOS first) from llama.cpp's logits."""
    import llama_cpp

    second, total = [], 0.0
    options = {"n_ctx": max(map(len, sequences)), "logits_all": True, "n_threads": threads}
    with llama_cpp_model(llama_cpp, path, **options) as llm:
        for ids, cut in zip(sequences, cuts, strict=True):
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(ids) - 1], dtype=np.float32))
            bits = -torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), ids[1:]] / np.log(2)
            second.append(float(bits[cut:].sum()))
            total += float(bits.sum())
    return float(np.mean(second)), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--types", default="f32,f16,q8_0,q5_1,q5_0,q4_1,q4_0")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer_dir = load_model(args.run)
    model.eval()
    tokenizer = load_tokenizer(tokenizer_dir)
    folds = run_normalization(args.run)
    lines = [
        line
        for line in flores_lines(resolve_data_dir(), folds["fold_homophones"], folds["fold_labialized"])
        if line
    ]
    sequences = [[tokenizer.bos_id, *tokenizer.encode(line)] for line in lines]
    cuts = [len(tokenizer.encode(line[: len(line) // 2])) for line in lines]
    n_bytes = sum(len(line.encode("utf-8")) for line in lines)
    with torch.no_grad():
        ours = score_lines(model, tokenizer, lines, "cpu")
    command = f"python benchmarks/gguf_types.py {args.run} --types {args.types} --threads {args.threads}"
    print(f"commit {git_commit()}, {machine_description()}, `{command}`; {len(lines)} FLORES lines")
    print("| weights | file | FLORES second-half bits | bits/byte | seconds |")
    print("|---|---|---|---|---|")
    print(f"| ours (PyTorch, fp32) | — | {ours.second_half_bits:.2f} | {ours.bits_per_byte:.4f} | — |")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            path = export_gguf(model, model.config, tokenizer_dir, Path(tmp) / f"{qtype}.gguf", qtype=qtype)
            started = time.perf_counter()
            second, total = llama_cpp_scores(path, sequences, cuts, args.threads)
            seconds = time.perf_counter() - started
            size = path.stat().st_size / 1e6
            bpb = total / n_bytes
            print(f"| llama.cpp, {qtype} | {size:.1f} MB | {second:.2f} | {bpb:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
