"""The server under bad input and failures: seeds torch cannot take, a request that fails to start while
others decode; each gets an OpenAI-shaped error and the rest of the server goes on."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx2
import pytest
import torch
from torch import Tensor

import fidellm.serve.engine
import serve_helpers
from fidellm.models.llama import LlamaForCausalLM, LMOutput
from fixtures.models import WrappedLM
from fixtures.server import loopback
from serve_helpers import app_for, error_of, run

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "ሰላም"}]
SEED_MAX = 2**64 - 1


tokenizer = serve_helpers.bpe_512
inner = serve_helpers.llama_768


class Slow(WrappedLM):
    """Sleeps `delay` s per decode step (so requests overlap) and counts them; with `fail_prefill` or
    `fail_decode` set, the next prompt prefill or decode step raises once."""

    def __init__(self, inner: LlamaForCausalLM, delay: float = 0.01):
        super().__init__(inner)
        self.delay, self.steps, self.fail_prefill, self.fail_decode = delay, 0, False, False

    def adjust(self, input_ids: Tensor, cache: Any, output: LMOutput) -> LMOutput:
        decode = input_ids.shape[1] == 1
        if (decode and self.fail_decode) or (not decode and self.fail_prefill):
            self.fail_prefill = self.fail_decode = False
            raise RuntimeError("injected failure")
        if decode:
            self.steps += 1
            time.sleep(self.delay)
        return output


def test_seeds_torch_cannot_take_are_a_400_naming_seed(inner, tokenizer) -> None:
    """Choice j of each prompt samples with seed + j: a seed past torch's range for any choice is
    refused, the largest one that fits is served (for every prompt of a list, each seeded alike)."""
    bad = [
        (CHAT, {"messages": HELLO, "seed": SEED_MAX + 1}),
        (CHAT, {"messages": HELLO, "seed": -(2**63) - 1}),
        (CHAT, {"messages": HELLO, "seed": SEED_MAX, "n": 2}),
        ("/v1/completions", {"prompt": ["ሰላም", "ሰኞ"], "seed": SEED_MAX, "n": 2}),
        ("/v1/completions", {"prompt": "ሰላም", "seed": SEED_MAX - 1, "n": 3}),
    ]

    async def body(_: Any, raw: httpx2.AsyncClient) -> None:
        for path, fields in bad:
            response = await raw.post(path, json={"model": "tiny", "max_tokens": 3, **fields})
            assert response.status_code == 400 and error_of(response)["param"] == "seed", fields
        for path, fields in [
            (CHAT, {"messages": HELLO, "seed": SEED_MAX}),
            (CHAT, {"messages": HELLO, "seed": -1, "n": 2}),
            ("/v1/completions", {"prompt": ["ሰላም", "ሰኞ"], "seed": SEED_MAX}),
        ]:
            response = await raw.post(path, json={"model": "tiny", "max_tokens": 3, **fields})
            assert response.status_code == 200, response.text

    run(app_for(inner, tokenizer), body)


@pytest.mark.parametrize("where", ["rows", "prefill"])
def test_a_request_failing_to_start_gets_a_500_and_the_others_go_on(
    inner, tokenizer, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """B fails while it is admitted (building its rows) or prefilled, as A decodes: B gets a 500, A gets
    the answer it gets alone, and the server serves the next request."""
    model = Slow(inner)
    if where == "rows":
        real = fidellm.serve.engine.new_rows

        def new_rows(*args: Any, owner: Any = None, **kwargs: Any) -> Any:
            if owner.config.seed == 99:
                raise RuntimeError("injected failure")
            return real(*args, owner=owner, **kwargs)

        monkeypatch.setattr(fidellm.serve.engine, "new_rows", new_rows)
    a = {"model": "tiny", "messages": HELLO, "max_tokens": 40, "temperature": 0}

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[Any]:
        async def request_b() -> httpx2.Response:
            while model.steps < 3:  # A is decoding
                await asyncio.sleep(0.005)
            model.fail_prefill = where == "prefill"
            return await raw.post(CHAT, json={**a, "max_tokens": 5, "seed": 99, "temperature": 1})

        first, second = await asyncio.wait_for(asyncio.gather(raw.post(CHAT, json=a), request_b()), 20)
        after = await asyncio.wait_for(raw.post(CHAT, json={**a, "max_tokens": 2}), 20)
        return [first, second, after]

    first, second, after = run(app_for(model, tokenizer), body)
    assert second.status_code == 500 and error_of(second)["type"] == "server_error"
    alone = run(app_for(inner, tokenizer), lambda _, raw: raw.post(CHAT, json=a))
    assert first.status_code == 200 and first.json()["choices"] == alone.json()["choices"]
    assert after.status_code == 200


def test_a_failing_decode_step_also_answers_the_requests_admitted_with_it(
    inner, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode step of the iteration that admits B fails: A (running) and B (admitted, not yet
    running) both get a 500 instead of B waiting forever, and the server serves the next request."""
    model = Slow(inner)
    admit = fidellm.serve.engine.Engine._admit

    def admit_and_fail(engine: fidellm.serve.engine.Engine) -> list[Any]:
        admitted = admit(engine)
        model.fail_decode = model.fail_decode or any(a.job.config.seed == 99 for a in admitted)
        return admitted

    monkeypatch.setattr(fidellm.serve.engine.Engine, "_admit", admit_and_fail)
    a = {"model": "tiny", "messages": HELLO, "max_tokens": 40, "temperature": 0}

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[httpx2.Response]:
        async def request_b() -> httpx2.Response:
            while model.steps < 3:  # A is decoding
                await asyncio.sleep(0.005)
            return await raw.post(CHAT, json={**a, "max_tokens": 5, "seed": 99})

        replies = await asyncio.wait_for(asyncio.gather(raw.post(CHAT, json=a), request_b()), 20)
        return [*replies, await asyncio.wait_for(raw.post(CHAT, json={**a, "max_tokens": 2}), 20)]

    first, second, after = run(app_for(model, tokenizer), body)
    assert [first.status_code, second.status_code, after.status_code] == [500, 500, 200]
    assert error_of(second)["type"] == "server_error"


class Endless(WrappedLM):
    """Always picks token `token` (never a stop), `delay` s per decode step: runs to max_tokens.
    `prefilled` counts the rows of every prompt prefill."""

    def __init__(self, inner: LlamaForCausalLM, token: int, delay: float):
        super().__init__(inner)
        self.token, self.delay, self.prefilled = token, delay, 0

    def adjust(self, input_ids: Tensor, cache: Any, output: LMOutput) -> LMOutput:
        logits = torch.full_like(output.logits, float("-inf"))
        logits[..., self.token] = 0.0
        if input_ids.shape[1] == 1:
            time.sleep(self.delay)
        elif cache is not None:
            self.prefilled += input_ids.shape[0]
        return LMOutput(logits)


def test_a_client_leaving_a_whole_response_frees_its_slot(inner, tokenizer) -> None:
    """A non-streamed request whose client gives up after 1 s leaves the batch within about one
    disconnect poll, although its decoder sends an event every step (it would run 10 s more)."""
    model = Endless(inner, tokenizer.encode("ሰላም")[-1], delay=0.025)
    app = app_for(model, tokenizer, max_tokens_cap=400)
    engine = app.state.server.engine
    with loopback(app) as base:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(
                base + CHAT, json={"model": "tiny", "messages": HELLO, "max_tokens": 400}, timeout=1.0
            )
        left = time.monotonic()
        while engine.running and time.monotonic() - left < 5:
            time.sleep(0.05)
        assert not engine.running and engine.active_rows == 0
        assert time.monotonic() - left < 2, "the abandoned request kept decoding"


def wait_until_idle(engine: Any, within: float) -> float:
    """Seconds until `engine` holds no request and no row (at most `within`)."""
    start = time.monotonic()
    while (engine._held or engine.running or engine.active_rows) and time.monotonic() - start < within:
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("ending", ["late", "left"])
def test_a_request_decoding_in_slices_stops_whole_when_late_or_left(inner, tokenizer, ending: str) -> None:
    """6 prompts with --max-batch 2 start two at a time: past its deadline the request gets its 504, or
    its client leaves and it is cancelled; either way no later prompt starts (the engine is idle at
    once, having prefilled at most the first two rows) and the next request is served."""
    endless = Endless(inner, tokenizer.encode("ሰላም")[-1], delay=0.01)
    big = {"model": "tiny", "prompt": ["ሰላም"] * 6, "max_tokens": 300}
    timeout_s = 0.5 if ending == "late" else 600.0
    app = app_for(endless, tokenizer, max_batch=2, max_tokens_cap=400, request_timeout_s=timeout_s)
    engine = app.state.server.engine
    with loopback(app) as base:
        if ending == "late":
            late = httpx2.post(base + "/v1/completions", json=big, timeout=10)
            assert late.status_code == 504 and error_of(late)["code"] == "timeout"
        else:
            with pytest.raises(httpx2.ReadTimeout):
                httpx2.post(base + "/v1/completions", json=big, timeout=1.0)
        assert wait_until_idle(engine, within=3) < 2 and endless.prefilled <= 2
        started = endless.prefilled
        after = httpx2.post(
            base + "/v1/completions", json={**big, "prompt": "ሰላም", "max_tokens": 2}, timeout=10
        )
        assert after.status_code == 200 and endless.prefilled == started + 1


def test_non_ascii_api_keys_are_compared_as_bytes(inner, tokenizer) -> None:
    """A non-ASCII key in the header is a 401 invalid_api_key, not a crash; a non-ASCII key given to
    the server matches the same key sent as UTF-8."""
    app = app_for(inner, tokenizer, api_keys=("k1", "ቁልፍ"))

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[httpx2.Response]:
        sent = ["Bearer ሰላም".encode(), "Bearer ቁልፍ".encode(), b"Bearer k1"]
        return [await raw.get("/v1/models", headers={"Authorization": header}) for header in sent]

    wrong, right, ascii_key = run(app, body)
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_api_key"
    assert right.status_code == 200 and ascii_key.status_code == 200


def test_the_request_held_for_a_free_slot_counts_as_waiting(inner, tokenizer) -> None:
    """--queue 1 --max-batch 1: while A decodes, B waits (taken from the queue, held for A's slot), so C
    is refused with 503; B is answered once A is done."""
    model = Slow(inner)
    app = app_for(model, tokenizer, queue_size=1, max_batch=1)
    engine = app.state.server.engine
    a = {"model": "tiny", "messages": HELLO, "max_tokens": 30, "temperature": 0}

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[httpx2.Response]:
        first = asyncio.ensure_future(raw.post(CHAT, json=a))
        while model.steps < 3:  # A is decoding
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(raw.post(CHAT, json={**a, "max_tokens": 2}))
        while engine._held is None:  # B is taken from the queue and held for A's slot
            await asyncio.sleep(0.005)
        third = await raw.post(CHAT, json={**a, "max_tokens": 2})
        return [*await asyncio.wait_for(asyncio.gather(first, second), 20), third]

    first, second, third = run(app, body)
    assert third.status_code == 503 and error_of(third)["type"] == "server_error"
    assert first.status_code == 200 and second.status_code == 200


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/completions", {"prompt": "ሰላም " * 2000}),
        (CHAT, {"messages": [{"role": "user", "content": "ሰላም " * 2000}]}),
    ],
)
def test_a_huge_prompt_is_tokenized_off_the_event_loop(
    inner, tokenizer, monkeypatch: pytest.MonkeyPatch, path: str, fields: dict[str, Any]
) -> None:
    """Tokenizing a prompt of megabytes takes seconds (a slow tokenizer stands in for one): it runs in a
    worker thread, so /health answers while it goes on instead of after it."""
    encode, started, finished = tokenizer.encode, threading.Event(), []

    def slow_encode(text: str, add_bos: bool = False) -> list[int]:
        if len(text) > 5000:
            started.set()
            time.sleep(1.5)
            finished.append(time.monotonic())
        return encode(text, add_bos)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)

    async def body(_: Any, raw: httpx2.AsyncClient) -> tuple[httpx2.Response, httpx2.Response, float]:
        pending = asyncio.ensure_future(raw.post(path, json={"model": "tiny", "max_tokens": 3, **fields}))
        while not started.is_set():  # with tokenization on the loop, this runs only after it ends
            await asyncio.sleep(0.005)
        health = await raw.get("/health")
        answered = time.monotonic()
        return await asyncio.wait_for(pending, 20), health, answered

    refused, health, answered = run(app_for(inner, tokenizer), body)
    assert health.status_code == 200 and answered < finished[0], "/health waited for the tokenizer"
    assert refused.status_code == 400 and error_of(refused)["code"] == "context_length_exceeded"
