"""The load generator of bench_serve.py: streaming clients of `fidellm serve` (the official `openai`
client, asyncio), one record per request, and the summaries (percentiles, per-window throughput).

Definitions (those of vLLM's benchmark_serving): TTFT = request sent -> first text chunk; latency =
request sent -> end of the stream; decode tok/s of a request = (tokens - 1) / (latency - TTFT). Tokens
are the server's usage counts (`stream_options.include_usage`), checked against what the stream showed.
A window's aggregate tok/s = all tokens generated / (last response - window start): no request starts
after the window closes and the ones running then are waited for, so every token counted was generated
inside the span timed (the drain slightly understates steady-state throughput, never overstates it).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import openai

SERVED_NAME = "bench"
REQUEST_TIMEOUT_S = 300.0
PAUSE_AFTER_ERROR_S = 0.1
"""A client that got an error waits this long before its next request, so a dead server gives a bounded
number of errors rather than a busy loop."""


@dataclass
class RequestRecord:
    """One request as its client saw it (times from time.perf_counter()). `error` None = a complete,
    consistent response; `tokens` is the usage count (0 when no usage arrived)."""

    start: float
    end: float
    ttft_s: float | None
    tokens: int
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    @property
    def decode_tok_s(self) -> float | None:
        """(tokens - 1) / (latency - TTFT); None for failed requests and those with fewer than 2 tokens."""
        if self.error is not None or self.ttft_s is None or self.tokens < 2:
            return None
        return (self.tokens - 1) / (self.latency_s - self.ttft_s)


def usage_problem(tokens: int | None, chunks: int, finish: str | None, max_tokens: int) -> str | None:
    """What is wrong with a streamed response's usage and finish reason, or None. Each decode step sends
    at most one text chunk per choice, so there cannot be more text chunks than tokens."""
    if tokens is None:
        return "no usage chunk"
    if finish is None:
        return "no finish_reason"
    if not 1 <= tokens <= max_tokens:
        return f"usage says {tokens} completion tokens, max_tokens is {max_tokens}"
    if finish == "length" and tokens != max_tokens:
        return f"finish_reason length after {tokens} of {max_tokens} tokens"
    if chunks > tokens:
        return f"{chunks} text chunks for {tokens} tokens"
    return None


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, seed: int) -> RequestRecord:
    """One streaming completion at temperature 1.0 with `seed`, timed."""
    start = time.perf_counter()
    ttft: float | None = None
    tokens: int | None = None
    finish: str | None = None
    chunks = 0
    try:
        stream = await client.completions.create(
            model=SERVED_NAME,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    chunks += 1
                    ttft = time.perf_counter() - start if ttft is None else ttft
                finish = choice.finish_reason or finish
    except Exception as error:  # any failure is one counted error; the load goes on
        return RequestRecord(
            start, time.perf_counter(), ttft, tokens or 0, f"{type(error).__name__}: {error}"
        )
    end = time.perf_counter()
    return RequestRecord(start, end, ttft, tokens or 0, usage_problem(tokens, chunks, finish, max_tokens))


@dataclass
class Window:
    """The requests of `clients` concurrent clients during one timed window."""

    clients: int
    start: float
    records: list[RequestRecord]

    @property
    def seconds(self) -> float:
        return max(record.end for record in self.records) - self.start

    @property
    def tokens(self) -> int:
        return sum(record.tokens for record in self.records)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


async def run_window(
    base_url: str, clients: int, seconds: float, prompt: str, max_tokens: int, seeds: Iterator[int]
) -> Window:
    """`clients` streaming clients, each sending requests back to back (at least one) until `seconds`
    have passed; requests running then are waited for."""
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    start = time.perf_counter()
    deadline = start + seconds

    async def client_loop() -> list[RequestRecord]:
        records = []
        while True:
            records.append(await one_request(client, prompt, max_tokens, next(seeds)))
            if time.perf_counter() >= deadline:
                return records
            if records[-1].error is not None:
                await asyncio.sleep(PAUSE_AFTER_ERROR_S)

    try:
        per_client = await asyncio.gather(*(client_loop() for _ in range(clients)))
    finally:
        await client.close()
    return Window(clients, start, list(itertools.chain.from_iterable(per_client)))


def distribution(values: list[float]) -> dict[str, float] | None:
    """p50, p99 (linear interpolation between order statistics), mean, min, max and n; None when empty."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(array, 50)),
        "p99": float(np.percentile(array, 99)),
        "mean": float(array.mean()),
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(values),
    }


def load_summary(windows: list[Window]) -> dict:
    """Per-window throughput and the pooled per-request distributions of windows with one client count."""
    records = [record for window in windows for record in window.records]
    ok = [record for record in records if record.error is None]
    rates = [rate for record in ok if (rate := record.decode_tok_s) is not None]
    return {
        "clients": windows[0].clients,
        "windows": [
            {"seconds": w.seconds, "requests": len(w.records), "tokens": w.tokens, "tok_s": w.tok_s}
            for w in windows
        ],
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_examples": sorted({record.error for record in records if record.error is not None})[:5],
        "tokens_per_request": distribution([float(record.tokens) for record in ok]),
        "latency_s": distribution([record.latency_s for record in ok]),
        "ttft_s": distribution([record.ttft_s for record in ok if record.ttft_s is not None]),
        "decode_tok_s": distribution(rates),
        "decode_tok_s_values": rates,
    }
