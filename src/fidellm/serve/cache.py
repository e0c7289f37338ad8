"""A response cache for deterministic requests: in-process LRU by default, or Redis shared by replicas.

Only requests whose output is fixed by their fields are cached: temperature 0 (greedy) or a seed given
(choice i samples with seed + i). The key is the SHA-256 of what is decoded, once the request has
passed every check: the endpoint, the model name, the prompts' token ids, the decoding settings (the
effective token budget, stop strings and ids as sets; a greedy request's seed and top_p, which it
never uses, left out) and the fields that shape the reply (n, echo, log-probabilities, tool calls).
So two requests that decode alike share an entry however they spell it (no max_tokens and the default
it stands for, a stop string alone or in a list, token ids or their text), also between servers with
another --max-tokens-cap, and two that decode differently never do. Replicas sharing a Redis must serve
the same weights under the same model name, since the weights are not part of the key.

Streams are neither served from nor stored in the cache: a streamed reply is one chunk per decode step
(with tool-call text held back until it is decided), which a replayed full response cannot reproduce
exactly, so replaying it would change what clients see. A hit is the stored body with a fresh `id`,
`created` and fresh tool-call ids, as a new generation would have.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from typing import Any, Protocol

import redis

from fidellm.generate.config import GenerationConfig
from fidellm.generate.sampling import GREEDY_BELOW
from fidellm.serve.schemas import SamplingFields, new_id, now

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 2.0


def cache_key(
    endpoint: str, request: SamplingFields, config: GenerationConfig | None, **reply: Any
) -> str | None:
    """The key of a deterministic, non-streamed request that decodes with `config` (None: scoring only)
    and whose reply also depends on `reply` (the prompts' token ids, n, ...); None when it must not be
    cached."""
    if request.stream or not (request.temperature == 0 or request.seed is not None):
        return None
    material = {"endpoint": endpoint, "model": request.model, "decoding": decoding(config), **reply}
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def decoding(config: GenerationConfig | None) -> dict[str, Any] | None:
    """The settings of `config` that change what is decoded, one form for each decoding: stops as sorted
    sets (any one of them ends a row, whatever their order), and greedy settings without the seed,
    top-k and top-p that the sampler ignores below `GREEDY_BELOW` (`generate.sampling`)."""
    if config is None:
        return None
    settings = dataclasses.asdict(config)
    settings["stop_strings"] = sorted(set(config.stop_strings))
    settings["stop_token_ids"] = sorted(set(config.stop_token_ids or ()))
    if config.temperature < GREEDY_BELOW:
        settings.update(temperature=0.0, seed=None, top_k=0, top_p=1.0)
    return settings


def refreshed(stored: str) -> dict[str, Any]:
    """A cached body as a new response: fresh id (same prefix), created and tool-call ids."""
    body = json.loads(stored)
    body["id"] = new_id(body["id"].rsplit("-", 1)[0])
    body["created"] = now()
    for choice in body.get("choices", []):
        for call in (choice.get("message") or {}).get("tool_calls") or []:
            call["id"] = f"call_{uuid.uuid4().hex[:24]}"
    return body


class ResponseCache(Protocol):
    """Stores response bodies (JSON text) by key."""

    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, body: str) -> None: ...


class InProcessLRU:
    """The `max_entries` most recently used responses of this process."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()

    async def get(self, key: str) -> str | None:
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
        return body

    async def put(self, key: str, body: str) -> None:
        self._entries[key] = body
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class RedisCache:
    """Responses in Redis under `prefix + key`, expiring after `ttl_s` seconds, so replicas share them.
    The cache only saves work: when Redis fails, a lookup is a miss and a store is skipped (logged)."""

    def __init__(self, url: str, ttl_s: int, prefix: str = "fidellm:cache:"):
        self.ttl_s, self.prefix = ttl_s, prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S, decode_responses=True
        )

    async def get(self, key: str) -> str | None:
        try:
            return await asyncio.to_thread(self.client.get, self.prefix + key)
        except redis.RedisError as error:
            log.warning("response cache lookup failed: %s", error)
            return None

    async def put(self, key: str, body: str) -> None:
        try:
            await asyncio.to_thread(self.client.set, self.prefix + key, body, ex=self.ttl_s)
        except redis.RedisError as error:
            log.warning("response cache store failed: %s", error)
