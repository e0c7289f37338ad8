"""The response cache (in-process LRU and Redis) and per-key rate limits of `fidellm serve`, through the
app in-process; the Redis tests run a real `redis-server` on a free loopback port."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import redis

import serve_helpers
from fidellm.models.llama import LlamaForCausalLM
from fidellm.serve.cache import InProcessLRU, RedisCache
from fidellm.serve.ratelimit import RedisTokenBucket, TokenBucket
from fidellm.tokenizer.bpe import BPETokenizer
from serve_helpers import CHAT, NAME, app_for, metric, run

tokenizer = serve_helpers.bpe_768
model = serve_helpers.llama_768

GREEDY: dict[str, Any] = dict(model=NAME, messages=CHAT, max_tokens=8, temperature=0)
HITS = "fidellm:response_cache_hits_total"


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_the_key_is_what_is_decoded(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    """With --max-tokens-cap 3 a completion without max_tokens decodes 3 tokens (OpenAI's default 16, cut
    to the cap), yet its key was that of an explicit max_tokens 16 (both dumped 16), so that request, a
    400 here, got the cached 3-token answer. The key is now what is decoded: requests that decode alike
    share an entry, also on a server with another cap (2); any difference in what is decoded or
    answered misses."""
    cache = InProcessLRU(64)
    apps = [app_for(model, tokenizer, cache=cache, max_tokens_cap=cap) for cap in (3, 2)]
    text = dict(model=NAME, prompt="ሰላም", temperature=0)
    ids = tokenizer.encode("ሰላም", add_bos=True)
    chat = {**GREEDY, "max_tokens": 2}
    completions, chats = "/v1/completions", "/v1/chat/completions"
    steps: list[tuple[int, str, dict[str, Any], int | None]] = [  # (app, path, body, status or None = a hit)
        (0, completions, text, 200),
        (0, completions, {**text, "max_tokens": 16}, 400),
        (0, completions, {**text, "max_tokens": 3}, None),
        (0, completions, {**text, "prompt": [ids], "max_tokens": 3, "seed": 3}, None),  # greedy: seed unused
        (1, completions, {**text, "max_tokens": 3}, 400),
        (1, completions, text, 200),  # the default is 2 tokens here
        (0, completions, {**text, "max_tokens": 2}, None),
        (0, completions, {**text, "max_tokens": 2, "echo": True}, 200),
        (0, completions, {**text, "max_tokens": 2, "logprobs": 1}, 200),
        (0, completions, {**text, "max_tokens": 2, "n": 2}, 200),
        (0, chats, chat, 200),
        (1, chats, {**chat, "max_tokens": None, "max_completion_tokens": 2}, None),
        (0, chats, {**chat, "max_tokens": 3, "max_completion_tokens": 2, "top_p": 0.5}, None),
        (0, chats, {**chat, "stop": "።"}, 200),
        (0, chats, {**chat, "stop": ["።", "።"]}, None),
        (0, chats, {**chat, "temperature": 0.7, "seed": 5}, 200),
        (0, chats, {**chat, "temperature": 0.8, "seed": 5}, 200),
        (0, chats, {**chat, "temperature": 0.8, "seed": 6}, 200),
        (1, chats, {**chat, "temperature": 0.8, "seed": 6}, None),
    ]

    async def main() -> None:
        transports = [httpx2.ASGITransport(app=app) for app in apps]
        clients = [httpx2.AsyncClient(transport=t, base_url="http://serve") for t in transports]
        hits_before = [0.0, 0.0]
        for number, (app, path, fields, status) in enumerate(steps):
            response = await clients[app].post(path, json=fields)
            hits = metric((await clients[app].get("/metrics")).text, HITS)
            hit, hits_before[app] = hits > hits_before[app], hits
            assert (response.status_code, hit) == (status or 200, status is None), (number, fields)
        for client in clients:
            await client.aclose()

    asyncio.run(main())


def test_lru_evicts_the_least_recently_used() -> None:
    async def scenario() -> None:
        lru = InProcessLRU(2)
        await lru.put("a", "A")
        await lru.put("b", "B")
        assert await lru.get("a") == "A"  # a is now the most recent
        await lru.put("c", "C")
        assert await lru.get("b") is None and await lru.get("a") == "A" and await lru.get("c") == "C"
        assert len(lru) == 2

    asyncio.run(scenario())


def test_cache_hit_is_the_same_body_and_counted(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer, cache=InProcessLRU(8))

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        first = (await raw.post("/v1/chat/completions", json=GREEDY)).json()
        second = (await raw.post("/v1/chat/completions", json={**GREEDY, "user": "someone"})).json()
        assert without_ids(second) == without_ids(first) and second["id"] != first["id"]
        assert second["id"].startswith("chatcmpl-")
        prompt = dict(model=NAME, prompt="ሰላም", max_tokens=6, temperature=0.9, seed=4, logprobs=2)
        texts = [(await raw.post("/v1/completions", json=prompt)).json() for _ in range(2)]
        assert without_ids(texts[0]) == without_ids(texts[1]) and texts[1]["id"].startswith("cmpl-")
        reply = await client.chat.completions.create(**GREEDY)  # the official client reads a hit
        assert reply.choices[0].message.content == first["choices"][0]["message"]["content"]
        metrics = (await raw.get("/metrics")).text
        assert metric(metrics, "fidellm:response_cache_hits_total") == 3
        assert metric(metrics, "fidellm:response_cache_misses_total") == 2
        generated = first["usage"]["completion_tokens"] + texts[0]["usage"]["completion_tokens"]
        assert metric(metrics, "fidellm:generation_tokens_total") == generated  # hits did not decode

    run(app, body)


def test_non_deterministic_and_streamed_requests_are_never_cached(
    model: LlamaForCausalLM, tokenizer: BPETokenizer
) -> None:
    cache = InProcessLRU(8)
    app = app_for(model, tokenizer, cache=cache)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        sampled = dict(model=NAME, messages=CHAT, max_tokens=6, temperature=1.0)
        for args in (sampled, {**sampled, "temperature": None}, {**GREEDY, "stream": True}):
            for _ in range(2):
                response = await raw.post("/v1/chat/completions", json=args)
                assert response.status_code == 200
        metrics = (await raw.get("/metrics")).text
        assert metric(metrics, "fidellm:response_cache_hits_total") == 0
        assert metric(metrics, "fidellm:response_cache_misses_total") == 0
        assert metric(metrics, "fidellm:request_success_total") == 6  # every request decoded
        assert len(cache) == 0

    run(app, body)


def test_rate_limit_per_key_then_recovery(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    clock = FakeClock()
    app = app_for(
        model, tokenizer, limiter=TokenBucket(rpm=30, burst=2, clock=clock), api_keys=("alpha", "beta")
    )

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        alpha = {"Authorization": "Bearer alpha"}
        assert [(await raw.get("/v1/models", headers=alpha)).status_code for _ in range(2)] == [200, 200]
        refused = await raw.get("/v1/models", headers=alpha)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"  # 30 rpm: 2 s a token
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert (await raw.get("/v1/models", headers={"Authorization": "Bearer beta"})).status_code == 200
        assert (await raw.get("/metrics")).status_code == 200  # not limited
        clock.now += 1.0
        assert (await raw.get("/v1/models", headers=alpha)).headers["retry-after"] == "1"
        clock.now += 1.0
        assert (await raw.get("/v1/models", headers=alpha)).status_code == 200
        with pytest.raises(openai.RateLimitError):  # the official client sees a 429
            await client.models.list()

    run(app, body, key="alpha")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free loopback port, stopped at teardown."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server): Redis sharing untested")
    port = free_port()
    options = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    server = subprocess.Popen(
        ["redis-server", *options, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_redis_shares_cache_and_limits_between_replicas(
    redis_url: str, model: LlamaForCausalLM, tokenizer: BPETokenizer
) -> None:
    clock = FakeClock()
    replicas = [
        app_for(
            model,
            tokenizer,
            cache=RedisCache(redis_url, ttl_s=60),
            limiter=RedisTokenBucket(redis_url, rpm=60, burst=3, clock=clock),
        )
        for _ in range(2)
    ]

    async def ask(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> tuple[httpx2.Response, str]:
        return await raw.post("/v1/chat/completions", json=GREEDY), (await raw.get("/metrics")).text

    first, metrics_a = run(replicas[0], ask)
    second, metrics_b = run(replicas[1], ask)
    assert first.status_code == second.status_code == 200
    assert without_ids(second.json()) == without_ids(first.json())
    assert second.json()["id"] != first.json()["id"]
    assert metric(metrics_a, "fidellm:response_cache_misses_total") == 1
    assert metric(metrics_b, "fidellm:response_cache_hits_total") == 1
    assert metric(metrics_b, "fidellm:generation_tokens_total") == 0  # replica B never decoded

    store = redis.Redis.from_url(redis_url)
    [entry] = store.keys("fidellm:cache:*")
    assert 0 < store.ttl(entry) <= 60
    assert not any(b"127.0.0.1" in key for key in store.keys("fidellm:ratelimit:*"))  # hashed

    async def models(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> httpx2.Response:
        return await raw.get("/v1/models")

    third = run(replicas[0], models)  # the client's third request of a shared burst of 3
    assert third.status_code == 200
    refused = run(replicas[1], models)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    clock.now += 1.0
    assert run(replicas[1], models).status_code == 200
