"""Chunked prefill in the serving engine: how long running streams wait while a long prompt arrives.

python benchmarks/bench_prefill_chunk.py [--preset 25m] [--streams 4] [--stream-tokens 400]
       [--prompt-tokens 1536] [--chunks 0,256,512] [--repeats 3] [--threads N]

The engine in process (`fidellm.serve.engine.Engine`, what `fidellm serve` runs, without HTTP), a
random-init Llama preset with the demo BPE (runs/demo/tokenizer). Per chunk setting and repeat:
`--streams` greedy requests start decoding; after their 8th token a request with a `--prompt-tokens`
prompt (FLORES-200 amh dev text) arrives. Measured, from the arrival of the long prompt to its first
token: the longest gap between two tokens of a running stream (what `--prefill-chunk` bounds), the
median gap, and the long request's time to first token (what chunking costs it). Prints markdown rows.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from pathlib import Path

import torch
from common import MARKDOWN_HEADER, markdown_row

from fidellm.generate.config import GenerationConfig
from fidellm.models.factory import build_model, preset_config
from fidellm.paths import resolve_data_dir
from fidellm.serve.engine import Engine, Job
from fidellm.serve.metrics import ServerMetrics
from fidellm.tokenizer.base import TextTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHORT_PROMPT = "ኢትዮጵያ በምሥራቅ አፍሪካ የምትገኝ ሀገር ስትሆን ዋና ከተማዋ አዲስ አበባ ናት።"
JOIN_AFTER = 8  # tokens each running stream has before the long prompt arrives


async def one_round(
    model: torch.nn.Module, tokenizer: TextTokenizer, args: argparse.Namespace, chunk: int, long: list[int]
) -> dict[str, float]:
    """One arrival of the long prompt among `args.streams` decoding streams (module docstring)."""
    engine = Engine(
        model, tokenizer, queue_size=64, metrics=ServerMetrics(), max_batch=16, prefill_chunk=chunk
    )
    greedy = GenerationConfig(max_new_tokens=args.stream_tokens, temperature=0, stop_token_ids=())
    short = tokenizer.encode(SHORT_PROMPT, add_bos=True)
    times: list[list[float]] = [[] for _ in range(args.streams)]

    async def stream(index: int) -> None:
        job = Job(prompts=[short], config=greedy, timeout=600)
        engine.submit(job)
        while (event := await job.events.get())[0] == "chunks":
            times[index].append(time.perf_counter())
        assert event[0] == "done", event

    async def long_request() -> tuple[float, float]:
        while min(len(t) for t in times) < JOIN_AFTER:
            await asyncio.sleep(0.001)
        job = Job(prompts=[long], config=GenerationConfig(max_new_tokens=2, temperature=0), timeout=600)
        arrival = time.perf_counter()
        engine.submit(job)
        first = await job.events.get()
        assert first[0] == "chunks", first
        return arrival, time.perf_counter()

    streams = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    arrival, first_token = await long_request()
    await asyncio.gather(*streams)
    await engine.stop()
    gaps = [b - a for t in times for a, b in itertools.pairwise(t) if arrival <= b and a <= first_token]
    if not gaps or any(t[-1] < first_token for t in times):
        raise SystemExit("the streams ended before the long prompt's first token: raise --stream-tokens")
    return {"max_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "ttft_s": first_token - arrival}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="25m")
    parser.add_argument("--streams", type=int, default=4, help="requests decoding when the long one arrives")
    parser.add_argument("--stream-tokens", type=int, default=400, help="max tokens of each running stream")
    parser.add_argument("--prompt-tokens", type=int, default=1536, help="length of the long prompt")
    parser.add_argument("--chunks", default="0,256,512", help="--prefill-chunk settings to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokenizer", type=Path, default=REPO / "runs" / "demo" / "tokenizer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    config = preset_config("llama", args.preset, tokenizer.vocab_size, 2048, {})
    model = build_model(config).eval()
    text = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8")
    long = tokenizer.encode(text, add_bos=True)[: args.prompt_tokens]
    if len(long) < args.prompt_tokens:
        raise SystemExit(f"FLORES dev gives only {len(long)} tokens; lower --prompt-tokens")

    chunks = [int(c) for c in args.chunks.split(",")]
    results: dict[int, list[dict[str, float]]] = {c: [] for c in chunks}
    asyncio.run(one_round(model, tokenizer, args, chunks[0], long))  # warm-up, not counted
    for _ in range(args.repeats):
        for chunk in chunks:  # interleaved, so drifts of the machine hit every setting alike
            results[chunk].append(asyncio.run(one_round(model, tokenizer, args, chunk, long)))

    command = (
        f"python benchmarks/bench_prefill_chunk.py --preset {args.preset} --streams {args.streams}"
        f" --stream-tokens {args.stream_tokens} --prompt-tokens {args.prompt_tokens} --chunks {args.chunks}"
        f" --repeats {args.repeats}"
    )
    print(MARKDOWN_HEADER)
    for chunk, rounds in results.items():
        setting = (
            f"{args.preset}, {args.streams} streams + a {args.prompt_tokens}-token prompt,"
            f" prefill chunk {chunk}"
        )
        for key, what in (
            ("max_gap_s", "longest wait of a running stream for its next token"),
            ("median_gap_s", "median gap between a running stream's tokens"),
            ("ttft_s", "long prompt's time to first token"),
        ):
            print(markdown_row(f"{setting}: {what}", command, [r[key] * 1000 for r in rounds], "ms"))


if __name__ == "__main__":
    main()
