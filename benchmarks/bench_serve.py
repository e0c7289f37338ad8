"""Load test of `fidellm serve` (issue 7) and single-stream decode side by side with llama.cpp.

python benchmarks/bench_serve.py [--model DIR] [--clients 8] [--seconds 20] [--repeats 3]
       [--max-tokens 128] [--max-batch 16] [--threads N] [--out FILE]

One command, loopback only, bounded in time (about 3 minutes with the defaults on 2 cores):
1. The model: DIR as given (anything `fidellm serve` loads), or the `25m` Llama preset with seeded
   random init and the demo BPE (runs/demo/tokenizer; without it a BPE trained here on FLORES-200 amh
   dev, the model vocabulary still padded to --vocab), exported as a float32 HF directory.
2. Single-stream decode of --max-tokens tokens from one prompt, --repeats times: in process
   (`BatchDecoder`, the loop `fidellm.generate.generate` runs: the engine alone) and, when llama_cpp
   imports, in llama.cpp on the same weights exported to GGUF f32 with n_threads = torch's threads.
3. `fidellm serve` in a subprocess on 127.0.0.1; per repeat a window of --seconds with one streaming
   client, then one with --clients streaming clients (serve_load.py: completions API, temperature 1.0,
   a new seed per request, fixed max_tokens; the clients run in this process).
Prints a markdown block for benchmarks/RESULTS.md, writes JSON (--out) and exits 1 when any request
failed or the server's token counter disagrees with the usage counts the clients received.
Decode tok/s everywhere = (tokens - 1) / (time of the last token - time of the first): prefill excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from common import MARKDOWN_HEADER, llama_cpp_model, machine_description, markdown_row
from serve_load import SERVED_NAME, Window, load_summary, run_window

from fidellm.eval.results import git_commit
from fidellm.export.gguf import export_gguf
from fidellm.export.hf import export_hf
from fidellm.generate.engine import BatchDecoder, GenerationConfig
from fidellm.models.factory import build_model, preset_config
from fidellm.models.llama import LlamaForCausalLM
from fidellm.models.load import load_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import TextTokenizer, load_tokenizer
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "runs" / "demo" / "tokenizer"
PROMPT = "ኢትዮጵያ በምሥራቅ አፍሪካ የምትገኝ ሀገር ስትሆን ዋና ከተማዋ አዲስ አበባ ናት።"
SERVER_START_S = 180.0
TARGET_BATCHING, TARGET_VS_LLAMA_CPP = 3.0, 0.5


@dataclass
class Decode:
    """One single-stream generation: tokens generated, time to the first, decode rate after it."""

    tokens: int
    ttft_s: float
    decode_tok_s: float


def decode_of(tokens: int, start: float, first: float, end: float) -> Decode:
    if tokens < 2:
        raise SystemExit(f"the prompt's continuation stopped after {tokens} token; try another --seed")
    return Decode(tokens, first - start, (tokens - 1) / (end - first))


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, str, str]:
    """(model directory, what the model is, where its tokenizer came from)."""
    if args.model is not None:
        return args.model.resolve(), f"{args.model} (given)", "the model directory's"
    if DEMO_TOKENIZER.is_dir():
        tokenizer_dir, source = DEMO_TOKENIZER, f"demo BPE ({DEMO_TOKENIZER.relative_to(REPO)})"
    else:
        lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
        tokenizer_dir = work / "tokenizer"
        trained = train_bpe(lines, 32000, show_progress=False)
        trained.save(tokenizer_dir)
        source = (
            f"BPE of {trained.vocab_size} ids trained here on FLORES-200 amh dev"
            f" ({DEMO_TOKENIZER.relative_to(REPO)} absent)"
        )
    vocab = max(BPETokenizer.load(tokenizer_dir).vocab_size, args.vocab)
    torch.manual_seed(args.seed)
    config = preset_config("llama", args.preset, vocab, 2048, {})
    export_hf(build_model(config), config, tokenizer_dir, work / "model", dtype="float32")
    return work / "model", f"{args.preset} preset, random init (seed {args.seed})", source


def time_engine(
    model: torch.nn.Module, tokenizer: TextTokenizer, prompt: list[int], max_tokens: int, seed: int
) -> Decode:
    """Our engine alone: one BatchDecoder row stepped to the end (what `generate` does), timed per step."""
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=1.0, seed=seed)
    start = time.perf_counter()
    decoder = BatchDecoder(model, tokenizer, [prompt], config)
    decoder.step()
    first = time.perf_counter()
    while not decoder.done:
        decoder.step()
    return decode_of(len(decoder.results[0].token_ids), start, first, time.perf_counter())


def time_llama_cpp(llama_cpp: ModuleType, llm: Any, prompt: list[int], tokens: int) -> tuple[Decode, float]:
    """llama.cpp decoding `tokens` tokens at temperature 1.0 (no top-k/top-p/min-p, like ours; its
    `generate` never stops at EOS), timed per token from Python; and its own decode timer's tok/s
    (llama-cpp-python exposes the context pointer the perf functions take only as `_ctx.ctx`)."""
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    generator = llm.generate(prompt, top_k=0, top_p=1.0, min_p=0.0, temp=1.0)
    start = time.perf_counter()
    next(generator)
    first = time.perf_counter()
    for _ in range(tokens - 1):
        next(generator)
    end = time.perf_counter()
    generator.close()
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return decode_of(tokens, start, first, end), perf.n_eval / (perf.t_eval_ms / 1000)


def llama_cpp_or_why_not(model: torch.nn.Module, tokenizer: TextTokenizer) -> ModuleType | str:
    """The llama_cpp module, or why llama.cpp cannot run this model side by side."""
    try:
        import llama_cpp
    except ImportError:
        return "llama_cpp does not import (llama-cpp-python is built from source by `make test-gguf`)"
    if not isinstance(model, LlamaForCausalLM) or not isinstance(tokenizer, BPETokenizer):
        return "the GGUF export covers Llama models with a BPE tokenizer only"
    return llama_cpp


def single_stream(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """In-process and llama.cpp decode, alternating repeat by repeat so that drift hits both alike;
    llama.cpp decodes as many tokens as our run of the same repeat did."""
    model, tokenizer_dir = load_model(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    result: dict[str, Any] = {
        "prompt_tokens": len(prompt),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "in_process": [],
    }
    llama_cpp = llama_cpp_or_why_not(model, tokenizer)
    with ExitStack() as stack:
        llm = None
        if isinstance(llama_cpp, str):
            result["llama_cpp_skipped"] = llama_cpp
        else:
            path = export_gguf(model, model.config, tokenizer_dir, work / "model-f32.gguf", qtype="f32")
            n_ctx = len(prompt) + args.max_tokens + 16
            threads = {"n_threads": args.threads, "n_threads_batch": args.threads}
            options = {"n_ctx": n_ctx, "seed": args.seed, **threads}
            llm = stack.enter_context(llama_cpp_model(llama_cpp, path, **options))
            result.update(
                llama_cpp=[], llama_cpp_eval_timer_tok_s=[], llama_cpp_version=llama_cpp.__version__
            )
            time_llama_cpp(llama_cpp, llm, prompt, args.max_tokens)  # warm-up
        time_engine(model, tokenizer, prompt, args.max_tokens, args.seed)  # warm-up
        for repeat in range(args.repeats):
            ours = time_engine(model, tokenizer, prompt, args.max_tokens, args.seed + repeat)
            result["in_process"].append(asdict(ours))
            message = f"decode {ours.tokens} tokens: in process {ours.decode_tok_s:.1f} tok/s"
            if llm is not None:
                theirs, timer = time_llama_cpp(llama_cpp, llm, prompt, ours.tokens)
                result["llama_cpp"].append(asdict(theirs))
                result["llama_cpp_eval_timer_tok_s"].append(timer)
                message += f", llama.cpp {theirs.decode_tok_s:.1f} tok/s (its timer {timer:.1f})"
            progress(message)
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@contextmanager
def running_server(model_dir: Path, args: argparse.Namespace, log_path: Path) -> Iterator[str]:
    """`fidellm serve MODEL_DIR` in a subprocess on a free loopback port, with torch's thread count set to
    --threads; yields its base URL once /health answers, stops it afterwards."""
    port = free_port()
    command = [
        sys.executable, "-m", "fidellm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--model-name", SERVED_NAME, "--max-batch", str(args.max_batch), "--cache-size", "0",
        "--max-tokens-cap", str(max(1024, args.max_tokens)),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not healthy(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"`{' '.join(command)}` did not come up; its log ends:\n{log_tail(log_path)}"
                )
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def generation_counter(base_url: str) -> float:
    """The server's Prometheus counter of generated tokens."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("fidellm:generation_tokens_total "):
                return float(line.split()[1])
    raise SystemExit(f"{base_url}/metrics has no fidellm:generation_tokens_total")


def load_test(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then per repeat a single-client window and a --clients window; summaries per count."""
    log_path = work / "server.log"
    seeds = itertools.count(args.seed * 1_000_000)
    windows: dict[int, list[Window]] = {1: [], args.clients: []}
    with running_server(model_dir, args, log_path) as base_url:
        warm = [asyncio.run(run_window(base_url, n, 0, PROMPT, args.max_tokens, seeds)) for n in windows]
        for _ in range(args.repeats):
            for clients, runs in windows.items():
                window = asyncio.run(
                    run_window(base_url, clients, args.seconds, PROMPT, args.max_tokens, seeds)
                )
                errors = sum(record.error is not None for record in window.records)
                progress(
                    f"{clients} client(s): {window.tok_s:.1f} tok/s, {len(window.records)} requests,"
                    f" {errors} errors in {window.seconds:.1f} s"
                )
                runs.append(window)
        counted = generation_counter(base_url)
    received = sum(window.tokens for window in warm + [w for runs in windows.values() for w in runs])
    server_errors = log_path.read_text(encoding="utf-8", errors="replace").count("Traceback")
    return {
        "summaries": {str(clients): load_summary(runs) for clients, runs in windows.items()},
        "warm_up_errors": sum(r.error is not None for window in warm for r in window.records),
        "server_generation_tokens": counted,
        "client_usage_tokens": received,
        "server_tracebacks": server_errors,
        "server_log_tail": log_tail(log_path) if server_errors else None,
    }


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ratios(decode: dict[str, Any], load: dict[str, Any], clients: int) -> dict[str, float | None]:
    """Batching (aggregate tok/s, --clients over 1, medians of windows) and our decode over llama.cpp's."""
    single, many = (load["summaries"][str(n)] for n in (1, clients))
    result: dict[str, float | None] = {
        "batching": statistics.median(w["tok_s"] for w in many["windows"])
        / statistics.median(w["tok_s"] for w in single["windows"]),
        "in_process_vs_llama_cpp": None,
        "server_vs_llama_cpp": None,
    }
    if "llama_cpp" in decode:
        theirs = statistics.median(run["decode_tok_s"] for run in decode["llama_cpp"])
        result["in_process_vs_llama_cpp"] = (
            statistics.median(run["decode_tok_s"] for run in decode["in_process"]) / theirs
        )
        if single["decode_tok_s"] is not None:
            result["server_vs_llama_cpp"] = single["decode_tok_s"]["p50"] / theirs
    return result


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return f"{value:.2f}× (target ≥ {target:g}×: {'met' if value >= target else 'NOT met'})"


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The block for benchmarks/RESULTS.md: setup, a median/spread table, a latency table, the targets."""
    command, decode, load, ratio = result["command"], result["decode"], result["load"], result["ratios"]
    summaries = load["summaries"]
    tokens = args.max_tokens
    lines = [
        f"Model: {result['model']}, {decode['parameters'] / 1e6:.2f}M parameters,"
        f" vocab {decode['vocab_size']};"
        f" tokenizer: {result['tokenizer']}. Prompt {decode['prompt_tokens']} tokens, max_tokens {tokens},"
        " temperature 1.0 with a new seed per request, streaming completions. Server: `fidellm serve"
        f" --max-batch {args.max_batch} --cache-size 0` in a subprocess on 127.0.0.1, torch"
        f" {result['torch']} with {args.threads} threads; clients: `openai` {result['openai']} (asyncio)"
        f" in the benchmark process; {args.repeats} windows of {args.seconds:g} s per client count.",
        "",
        MARKDOWN_HEADER,
    ]
    rate = [run["decode_tok_s"] for run in decode["in_process"]]
    lines.append(markdown_row(f"decode, in process (BatchDecoder), {tokens} tokens", command, rate, "tok/s"))
    if "llama_cpp" in decode:
        what = f"decode, llama.cpp {decode['llama_cpp_version']} (GGUF f32, {args.threads} threads)"
        rate = [run["decode_tok_s"] for run in decode["llama_cpp"]]
        lines.append(markdown_row(f"{what}, {tokens} tokens", command, rate, "tok/s"))
        timer = decode["llama_cpp_eval_timer_tok_s"]
        lines.append(markdown_row(f"{what}, its own eval timer", command, timer, "tok/s"))
    if summaries["1"]["decode_tok_s_values"]:
        what = "decode through the server (HTTP + SSE), 1 client, per request"
        lines.append(markdown_row(what, command, summaries["1"]["decode_tok_s_values"], "tok/s"))
    for clients, summary in summaries.items():
        rate = [window["tok_s"] for window in summary["windows"]]
        what = f"server aggregate, {clients} streaming client{'s' * (clients != '1')}, per window"
        lines.append(markdown_row(what, command, rate, "tok/s"))
    lines += [
        "",
        "| clients | requests | errors | tokens/request | latency p50 | latency p99 | TTFT p50 | TTFT p99 |"
        " decode tok/s per stream (p50) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for clients, summary in summaries.items():
        cells = [clients, str(summary["requests"]), str(summary["errors"])]
        per_request = summary["tokens_per_request"]
        cells.append(f"{per_request['min']:.0f}-{per_request['max']:.0f}" if per_request else "-")
        for key, scale, unit in (("latency_s", 1, "s"), ("ttft_s", 1000, "ms")):
            stats = summary[key]
            cells += [
                f"{stats[q] * scale:.{2 if unit == 's' else 0}f} {unit}" if stats else "-"
                for q in ("p50", "p99")
            ]
        stream = summary["decode_tok_s"]
        cells.append(f"{stream['p50']:.1f}" if stream else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"- Batching: aggregate tok/s with {args.clients} clients over 1 client:"
        f" {verdict(ratio['batching'], TARGET_BATCHING)}.",
    ]
    if "llama_cpp" in decode:
        in_process = verdict(ratio["in_process_vs_llama_cpp"], TARGET_VS_LLAMA_CPP)
        served = verdict(ratio["server_vs_llama_cpp"], TARGET_VS_LLAMA_CPP)
        lines.append(
            f"- Single-stream decode over llama.cpp's: in process {in_process}; through the server {served}."
        )
    else:
        lines.append(f"- llama.cpp side by side skipped: {decode['llama_cpp_skipped']}.")
    lines.append(
        f"- The server's generation-token counter ({load['server_generation_tokens']:.0f}) and the usage"
        f" counts the clients received ({load['client_usage_tokens']}) "
        + ("agree." if load["server_generation_tokens"] == load["client_usage_tokens"] else "DISAGREE.")
    )
    return "\n".join(lines)


def failures(result: dict[str, Any]) -> list[str]:
    """Why this run is not a valid load test (errors, a token count mismatch, server tracebacks)."""
    load = result["load"]
    found = [
        f"{summary['errors']} failed requests with {clients} client(s), e.g. {summary['error_examples']}"
        for clients, summary in load["summaries"].items()
        if summary["errors"]
    ]
    if load["warm_up_errors"]:
        found.append(f"{load['warm_up_errors']} failed warm-up requests")
    if load["server_generation_tokens"] != load["client_usage_tokens"]:
        found.append("the server's generation-token counter disagrees with the usage counts received")
    if load["server_tracebacks"]:
        found.append(f"{load['server_tracebacks']} tracebacks in the server log:\n{load['server_log_tail']}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="serve this model directory instead of a random preset")
    parser.add_argument("--preset", default="25m", help="Llama preset to build (without --model)")
    parser.add_argument("--vocab", type=int, default=32000, help="least model vocabulary (the demo BPE's)")
    parser.add_argument("--seed", type=int, default=0, help="init seed; also the first sampling seed")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (>= 2)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load window")
    parser.add_argument("--repeats", type=int, default=3, help="decode runs and load windows per setting")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp")
    parser.add_argument("--out", type=Path, help="JSON file [default: benchmarks/results/serve-...json]")
    args = parser.parse_args()
    if args.clients < 2 or args.repeats < 1 or args.seconds <= 0 or args.max_tokens < 2 or args.threads < 1:
        parser.error("need --clients >= 2, --repeats >= 1, --seconds > 0, --max-tokens >= 2, --threads >= 1")
    torch.set_num_threads(args.threads)
    import openai

    label = args.model.resolve().name if args.model is not None else args.preset
    out = args.out or REPO / "benchmarks" / "results" / f"serve-{label}-c{args.clients}.json"
    result: dict[str, Any] = {
        "commit": git_commit(),
        "machine": machine_description(),
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "torch": torch.__version__,
        "openai": openai.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
        work = Path(tmp)
        model_dir, result["model"], result["tokenizer"] = prepare_model(args, work)
        progress(f"model: {result['model']}; tokenizer: {result['tokenizer']}")
        result["decode"] = single_stream(model_dir, work, args)
        result["load"] = load_test(model_dir, work, args)
    result["ratios"] = ratios(result["decode"], result["load"], args.clients)
    result["markdown"] = markdown(result, args)
    print(result["markdown"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    progress(f"wrote {out}")
    problems = failures(result)
    if problems:
        raise SystemExit("not a valid load test:\n- " + "\n- ".join(problems))


if __name__ == "__main__":
    main()
