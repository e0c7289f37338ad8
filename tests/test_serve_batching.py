"""Continuous batching in the server: concurrent requests decode in one batch, each getting exactly the
answer it gets alone; a request arriving mid-decode joins without waiting; `max_batch` is respected."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
import torch
from torch import Tensor, nn

import serve_helpers
from fidellm.models.hnet import HNetForCausalLM
from fidellm.models.hnet import preset as hnet_preset
from fidellm.models.llama import LlamaForCausalLM, LMOutput
from fidellm.serve.engine import Engine
from fidellm.tokenizer.bpe import BPETokenizer
from fidellm.tokenizer.bytes import ByteTokenizer
from fixtures.models import WrappedLM
from fixtures.server import loopback
from serve_helpers import NAME, app_for, run

tokenizer = serve_helpers.bpe_512
inner = serve_helpers.llama_768


class Recording(WrappedLM):
    """Wraps a model and records the batch size of every cached decode step (one new token per row);
    `delay` seconds per step make decoding slow enough for requests to overlap. Once `engine` is set,
    also the engine's active rows (decoding or being prefilled) at every cached call."""

    def __init__(self, inner: LlamaForCausalLM, delay: float = 0.0):
        super().__init__(inner)
        self.delay = delay
        self.decode_batches: list[int] = []
        self.engine: Engine | None = None
        self.active: list[int] = []

    def adjust(self, input_ids: Tensor, cache: Any, output: LMOutput) -> LMOutput:
        if cache is not None and self.engine is not None:
            self.active.append(self.engine.active_rows)
        if cache is not None and input_ids.shape[1] == 1:
            self.decode_batches.append(input_ids.shape[0])
            time.sleep(self.delay)
        return output


REQUESTS = [
    dict(messages=[{"role": "user", "content": "ሰላም"}], max_tokens=12, temperature=0),
    dict(messages=[{"role": "user", "content": "የኢትዮጵያ ዋና ከተማ የት ነው?"}], max_tokens=20, seed=4),
    dict(messages=[{"role": "user", "content": "ሰኞ"}], max_tokens=7, seed=1, n=2, temperature=0.7),
    dict(
        messages=[{"role": "system", "content": "አጭር መልስ።"}, {"role": "user", "content": "ዛሬ"}],
        max_tokens=16,
        top_p=0.8,
        seed=2,
    ),
]


def answers(client: openai.AsyncOpenAI, concurrently: bool) -> Any:
    async def one(request: dict[str, Any]) -> list[str]:
        reply = await client.chat.completions.create(model=NAME, **request)
        return [choice.message.content for choice in reply.choices]

    async def all_of() -> list[list[str]]:
        if concurrently:
            return list(await asyncio.gather(*(one(r) for r in REQUESTS)))
        return [await one(r) for r in REQUESTS]

    return all_of()


def test_each_prompt_of_a_seeded_request_samples_as_if_sent_alone(inner, tokenizer) -> None:
    """Choice j of every prompt samples with seed + j, as vLLM runs each prompt of a list as its own
    request: a prompt's text no longer depends on the prompts before it (prompt i took seed + i*n + j,
    so two equal prompts got different texts and lm-eval's answers changed with its batch size)."""

    async def body(client: openai.AsyncOpenAI, _: Any) -> None:
        args: dict[str, Any] = dict(model=NAME, max_tokens=10, temperature=1.0, seed=11, n=2)
        both = await client.completions.create(prompt=["ሰላም", "የኢትዮጵያ ዋና ከተማ"], **args)
        first = await client.completions.create(prompt="ሰላም", **args)
        second = await client.completions.create(prompt="የኢትዮጵያ ዋና ከተማ", **args)
        texts = [choice.text for choice in both.choices]
        assert texts == [c.text for c in first.choices] + [c.text for c in second.choices]
        assert texts[0] != texts[1]  # the choices of one prompt still differ (seed + j)

    run(app_for(inner, tokenizer), body)


@pytest.mark.parametrize("max_batch", [16, 2])
def test_concurrent_requests_batch_and_answer_as_alone(inner, tokenizer, max_batch: int) -> None:
    solo_model = Recording(inner)
    solo = run(app_for(solo_model, tokenizer), lambda client, _: answers(client, concurrently=False))
    assert max(solo_model.decode_batches) == 2  # sequential: only the n=2 request has two rows
    batched_model = Recording(inner, delay=0.002)
    batched = run(
        app_for(batched_model, tokenizer, max_batch=max_batch),
        lambda client, _: answers(client, concurrently=True),
    )
    assert batched == solo
    assert max(batched_model.decode_batches) == min(max_batch, 5)
    assert len(batched_model.decode_batches) < len(solo_model.decode_batches)


PROMPTS = ["ሰላም", "የኢትዮጵያ ዋና ከተማ", "ሰኞ", "ዛሬ ጥሩ ቀን ነው።", "አዲስ አበባ ውብ ከተማ ናት"]


def recorded_app(model: Recording, tokenizer: BPETokenizer, **settings: Any) -> Any:
    """`app_for` with the recording model watching the app's engine."""
    app = app_for(model, tokenizer, **settings)
    model.engine = app.state.server.engine
    return app


def test_a_request_larger_than_max_batch_decodes_in_slices_with_the_same_answer(inner, tokenizer) -> None:
    """5 prompts × n 2 with --max-batch 4: never more than 4 rows are active (prefilling or decoding;
    they were 10 in one batch), two prompts at a time, yet the seeded answer is the one a single batch
    gives: every choice's text, finish reason and logprobs, their order and the usage, plain and
    streamed."""
    request: dict[str, Any] = dict(model=NAME, prompt=PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=7)

    async def body(client: openai.AsyncOpenAI, _: Any) -> tuple[dict[str, Any], list[str], list[Any], Any]:
        plain = await client.completions.create(**request, logprobs=2)
        stream = await client.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        texts, finishes, usage = [""] * 10, [None] * 10, None
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                finishes[choice.index] = choice.finish_reason or finishes[choice.index]
            usage = chunk.usage or usage
        return plain.model_dump(exclude={"id", "created"}), texts, finishes, usage

    whole_model, sliced_model = Recording(inner), Recording(inner)
    whole = run(recorded_app(whole_model, tokenizer, max_batch=16), body)
    sliced = run(recorded_app(sliced_model, tokenizer, max_batch=4), body)
    assert max(whole_model.active) == 10
    assert max(sliced_model.active) == 4 and max(sliced_model.decode_batches) == 4
    assert sliced == whole
    plain, texts, finishes, usage = sliced
    assert texts == [choice["text"] for choice in plain["choices"]]
    assert finishes == [choice["finish_reason"] for choice in plain["choices"]]
    assert usage.model_dump() == plain["usage"] and len(set(texts)) > 5  # seeded samples, not all alike


def test_a_prompt_whose_n_exceeds_max_batch_runs_alone(inner, tokenizer) -> None:
    """--max-batch 2 and n 3: the prompt's three choices decode together (a prompt is never split),
    alone: a request sent with it waits instead of joining. Each is answered as if alone (the n 1
    request's text is the first choice of the n 3 one, both seeded alike)."""
    chat = dict(model=NAME, messages=REQUESTS[0]["messages"], max_tokens=6, temperature=1.0, seed=5)

    async def body(client: openai.AsyncOpenAI, _: Any) -> list[list[str]]:
        replies = await asyncio.gather(
            client.chat.completions.create(**chat, n=3), client.chat.completions.create(**chat, n=1)
        )
        return [[choice.message.content for choice in reply.choices] for reply in replies]

    model = Recording(inner, delay=0.002)
    together = run(recorded_app(model, tokenizer, max_batch=2), body)
    assert max(model.active) == 3
    assert together[1] == together[0][:1]  # the second request is the first choice of the first


def test_a_prefill_chunk_smaller_than_a_batch_still_feeds_a_column_per_step(inner, tokenizer) -> None:
    """--prefill-chunk 1 with batches of up to 5 rows: every part feeds one column, nothing stalls, and
    every request gets its solo answer."""
    solo = run(app_for(inner, tokenizer), lambda client, _: answers(client, concurrently=False))
    slow = Recording(inner, delay=0.002)
    chunked = run(
        app_for(slow, tokenizer, prefill_chunk=1), lambda client, _: answers(client, concurrently=True)
    )
    assert chunked == solo


@pytest.mark.parametrize(("n", "prefill_chunk"), [(1, 512), (2, 1)])
def test_request_arriving_mid_decode_joins_the_running_batch(inner, tokenizer, n, prefill_chunk) -> None:
    """B arrives while A streams 60 tokens (of random, mostly held-back bytes); B (5 tokens, n choices)
    joins A's batch and is answered long before A ends, also when its 2-row prompt is fed through a
    1-position prefill budget (each part still feeds one column; the last goes to B's first step)."""
    model = Recording(inner, delay=0.01)
    events: list[str] = []

    async def body(client: openai.AsyncOpenAI) -> None:
        async def stream_a() -> None:
            stream = await client.chat.completions.create(
                model=NAME, messages=REQUESTS[0]["messages"], max_tokens=60, temperature=0, stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    events.append("A done")

        async def request_b() -> None:
            while len(model.decode_batches) < 5:  # A is decoding
                await asyncio.sleep(0.005)
            events.append("B sent")
            await client.chat.completions.create(
                model=NAME, messages=REQUESTS[1]["messages"], max_tokens=5, n=n
            )
            events.append("B done")

        await asyncio.gather(stream_a(), request_b())

    with loopback(app_for(model, tokenizer, max_tokens_cap=128, prefill_chunk=prefill_chunk)) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=30)
        asyncio.run(body(client))
    assert events == ["B sent", "B done", "A done"]
    assert n + 1 in model.decode_batches and model.decode_batches[-1] == 1  # joined, then A alone again


def test_hnet_requests_overlap_in_their_own_batches() -> None:
    """H-Net caches cannot merge: requests admitted together share one right-padded batch, later ones
    get a batch of their own stepped in turn; each gets its solo answer either way."""
    torch.manual_seed(0)
    hnet = HNetForCausalLM(hnet_preset("hnet-tiny", max_position_embeddings=256)).eval()
    requests = [dict(r, max_tokens=12) for r in REQUESTS[:2]]

    def answers_of(model: nn.Module, concurrently: bool) -> list[list[str]]:
        async def body(client: openai.AsyncOpenAI, _: Any) -> list[list[str]]:
            async def one(request: dict[str, Any]) -> list[str]:
                reply = await client.chat.completions.create(model=NAME, **request)
                return [choice.message.content for choice in reply.choices]

            if concurrently:
                return list(await asyncio.gather(*(one(r) for r in requests)))
            return [await one(r) for r in requests]

        return run(app_for(model, ByteTokenizer()), body)

    recording = Recording(hnet, delay=0.002)
    assert answers_of(recording, concurrently=True) == answers_of(hnet, concurrently=False)
    assert max(recording.decode_batches) <= len(requests)


def test_waiting_chunks_are_joined_into_one_event() -> None:
    """A stream consumer that fell behind gets the queued steps' text in one event, then the outcome."""
    from fidellm.serve.common import job_events
    from fidellm.serve.engine import Job

    async def main() -> list[tuple[Any, ...]]:
        job = Job(prompts=[[1], [1]], config=None, timeout=10)
        steps = [("chunks", ["ሰ", ""]), ("chunks", ["ላ", "a"]), ("chunks", ["ም", "b"]), ("done", [], None)]
        for event in steps:
            job.events.put_nowait(event)
        return [event async for event in job_events(job, request=None)]  # type: ignore[arg-type]

    assert asyncio.run(main()) == [("chunks", ["ሰላም", "ab"]), ("done", [], None)]


def test_a_quiet_poll_is_not_an_error_on_python_3_10(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Python 3.11 `asyncio.wait_for` raises `asyncio.TimeoutError`, which is not the built-in
    TimeoutError: a job quiet for one disconnect poll then failed its request with a 500. Emulated here
    on any Python: a distinct asyncio.TimeoutError, raised by a poll that finds the queue empty."""
    from fidellm.serve import common
    from fidellm.serve.engine import Job

    class LegacyTimeoutError(Exception):
        pass

    async def poll(awaitable: Any, timeout: float) -> Any:
        task = asyncio.ensure_future(awaitable)
        await asyncio.sleep(0)
        if not task.done():
            task.cancel()
            raise LegacyTimeoutError
        return task.result()

    class Connected:
        async def is_disconnected(self) -> bool:
            return False

    monkeypatch.setattr(common.asyncio, "TimeoutError", LegacyTimeoutError)
    monkeypatch.setattr(common.asyncio, "wait_for", poll)

    async def main() -> list[tuple[Any, ...]]:
        job = Job(prompts=[[1]], config=None, timeout=10)
        asyncio.get_running_loop().call_later(0.05, job.events.put_nowait, ("done", [], None))
        return [event async for event in common.job_events(job, request=Connected())]  # type: ignore[arg-type]

    assert asyncio.run(main()) == [("done", [], None)]


class Calls(WrappedLM):
    """Wraps a model and records every call as (rows, new positions, cached positions); decode steps
    (one new position) sleep `delay` seconds so that requests overlap."""

    def __init__(self, inner: LlamaForCausalLM, delay: float):
        super().__init__(inner)
        self.delay = delay
        self.calls: list[tuple[int, int, int]] = []

    def forward(self, input_ids: Tensor, cache: Any = None, **kwargs: Any) -> LMOutput:
        cached = cache[0].length if cache else 0
        output = super().forward(input_ids, cache=cache, **kwargs)
        self.calls.append((input_ids.shape[0], input_ids.shape[1], cached))
        if input_ids.shape[1] == 1:
            time.sleep(self.delay)
        return output


LONG = dict(messages=[{"role": "user", "content": " ".join(["የኢትዮጵያ ዋና ከተማ የት ነው?"] * 24)}], max_tokens=5)


@pytest.mark.parametrize("prefill_chunk", [0, 32])
def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(inner, tokenizer, prefill_chunk) -> None:
    """B's long prompt arrives while A streams: with --prefill-chunk 32 it is fed 32 positions per
    iteration, each after a decode step of A, so A never waits for the whole prompt; with 0 it is fed
    at once. Both answers equal the unchunked ones."""
    model = Calls(inner, delay=0.01)

    prompt: list[int] = []

    async def body(client: openai.AsyncOpenAI, _: Any) -> list[str]:
        async def stream_a() -> str:
            stream = await client.chat.completions.create(
                model=NAME, messages=REQUESTS[0]["messages"], max_tokens=60, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def request_b() -> str:
            while sum(n == 1 for _, n, _ in model.calls) < 3:  # A is decoding
                await asyncio.sleep(0.005)
            reply = await client.chat.completions.create(model=NAME, temperature=0, **LONG)
            prompt.append(reply.usage.prompt_tokens)
            return reply.choices[0].message.content

        return list(await asyncio.gather(stream_a(), request_b()))

    app = app_for(model, tokenizer, max_tokens_cap=128, prefill_chunk=prefill_chunk)
    answers = run(app, body)
    assert prompt[0] > 4 * 32 and prompt[0] % 32 != 1  # (else B's last part would look like a decode step)
    feeds = [i for i, (_, n, _) in enumerate(model.calls) if n > 1][1:]  # B's; the first is A's prompt
    assert sum(model.calls[i][1] for i in feeds) == prompt[0]
    if prefill_chunk:
        assert len(feeds) == -(-prompt[0] // 32) and all(model.calls[i][1] <= 32 for i in feeds)
        between = [n for _, n, _ in model.calls[feeds[0] : feeds[-1]]]
        assert between.count(1) >= len(feeds) - 1  # A stepped between every two parts
    else:
        assert len(feeds) == 1
    reference = run(app_for(inner, tokenizer, max_tokens_cap=128, prefill_chunk=0), body_alone)
    assert answers == reference


async def body_alone(client: openai.AsyncOpenAI, _: Any) -> list[str]:
    first = await client.chat.completions.create(
        model=NAME, messages=REQUESTS[0]["messages"], max_tokens=60, temperature=0
    )
    second = await client.chat.completions.create(model=NAME, temperature=0, **LONG)
    return [first.choices[0].message.content, second.choices[0].message.content]
