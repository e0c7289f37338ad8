"""What the endpoints share: server settings, OpenAI-style errors, the checks every generation request
passes (model name, token budget, context length), the response cache, and waiting on a job's events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from torch import nn

from fidellm.errors import FidelError
from fidellm.generate.config import check_seed
from fidellm.generate.engine import GenerationConfig, default_stop_ids
from fidellm.serve.cache import ResponseCache, refreshed
from fidellm.serve.engine import Engine, Job, QueueFullError, RequestTimeoutError
from fidellm.serve.schemas import ErrorBody, ErrorDetail, Response, SamplingFields
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.special import IM_END, IM_END_ID

DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True)
class ServeSettings:
    """`model_name` is what clients put in "model"; `max_tokens_cap` bounds max_tokens per request;
    `api_keys` empty = no authentication; `request_timeout_s` counts from arrival (queueing included);
    `max_batch` sequences (choices of all running requests) decode together; an engine iteration feeds
    at most `prefill_chunk` prompt positions while others decode (0 = whole prompts; `serve.engine`)."""

    model_name: str
    max_tokens_cap: int = 1024
    queue_size: int = 64
    max_batch: int = 16
    prefill_chunk: int = 512
    api_keys: tuple[str, ...] = ()
    request_timeout_s: float = 600.0
    max_body_bytes: int = 4 * 1024 * 1024


class APIError(Exception):
    """An error the client sees as OpenAI's {"error": {message, type, param, code}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=detail).model_dump()


@dataclass
class ServerState:
    """Everything a handler needs, stored on `app.state.server`; `cache` None = no response cache."""

    model: nn.Module
    tokenizer: TextTokenizer
    settings: ServeSettings
    engine: Engine
    cache: ResponseCache | None = None

    @property
    def context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.settings.model_name}'.",
                param="model",
                code="model_not_found",
            )

    def budget(self, requested: int | None, prompt_lengths: list[int], param: str, prompt_param: str) -> int:
        """The number of new tokens to generate: `requested` (the field `param`), or what the context
        leaves (up to the cap); a prompt too long for the context is an error of `prompt_param` (the
        field that holds it: "messages" or "prompt")."""
        cap = self.settings.max_tokens_cap
        if requested is not None and requested > cap:
            raise APIError(400, f"{param} is {requested}; this server allows at most {cap}.", param=param)
        longest = max(prompt_lengths)
        if longest >= self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has {longest}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            return min(cap, self.context - longest)
        if longest + requested > self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you requested"
                f" {longest + requested} tokens ({longest} in the prompt, {requested} for the completion).",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def generation_config(
        self, request: SamplingFields, max_new_tokens: int, rows: int, chat: bool = False
    ) -> GenerationConfig:
        """Decoding settings of a request decoding `rows` choices per prompt (choice i samples with
        seed + i, which must stay a seed torch accepts); a chat also stops at `<|im_end|>` (its id, or
        its text for a byte model), the end of its turn."""
        if request.seed is not None:
            try:
                check_seed(request.seed, rows)
            except FidelError as error:
                raise APIError(400, str(error), param="seed") from error
        stop_ids, stop_strings = default_stop_ids(self.model, self.tokenizer), request.stop_strings()
        if chat and self.tokenizer.encode(IM_END) == [IM_END_ID]:
            stop_ids += (IM_END_ID,)
        elif chat:  # a byte model writes the marker as text
            stop_strings = (*stop_strings, IM_END)
        try:
            return GenerationConfig(
                stop_token_ids=stop_ids,
                max_new_tokens=max_new_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                stop_strings=stop_strings,
                seed=request.seed,
                add_bos=False,
            )
        except FidelError as error:
            raise APIError(400, str(error)) from error

    async def cached(self, key: str | None) -> dict[str, Any] | None:
        """The reply stored under `key` (`cache.cache_key`; None = not cacheable) as a new response,
        or None; a lookup counts as a cache hit or miss."""
        if key is None or self.cache is None:
            return None
        stored = await self.cache.get(key)
        if stored is None:
            self.engine.metrics.cache_misses.inc()
            return None
        self.engine.metrics.cache_hits.inc()
        return refreshed(stored)

    async def remember(self, key: str | None, reply: Response) -> None:
        """Store `reply` under `key` (nothing when None or without a cache)."""
        if key is not None and self.cache is not None:
            await self.cache.put(key, json.dumps(reply.wire(), ensure_ascii=False))

    def submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except QueueFullError as error:
            raise APIError(
                503, "The server is busy (request queue full); retry later.", type="server_error"
            ) from error


def error_from_event(error: BaseException) -> APIError:
    """The client-facing error for an engine failure."""
    if isinstance(error, FidelError):
        return APIError(400, str(error))
    if isinstance(error, RequestTimeoutError):
        return APIError(504, "The request timed out.", type="timeout", code="timeout")
    return APIError(500, "Internal error during generation.", type="server_error")


async def job_events(job: Job, request: Request) -> AsyncIterator[tuple[Any, ...]]:
    """The job's events up to and including "done" or "error"; cancels the job if the client leaves
    (checked every `DISCONNECT_POLL_S` seconds, whether or not events keep coming) or the consumer
    stops early. "chunks" events already waiting are joined into one (text per row concatenated), so a
    consumer that falls behind the decoder sends fewer, larger SSE events instead of lagging further:
    the same text, less per-event overhead under load."""
    finished = False
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # before Python 3.11 not the built-in TimeoutError
                event = None
            if event is None or time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            following = None
            while event[0] == "chunks" and not job.events.empty():
                following = job.events.get_nowait()
                if following[0] != "chunks":
                    break
                event = ("chunks", [a + b for a, b in zip(event[1], following[1], strict=True)])
                following = None
            for item in (event, following):
                if item is None:
                    continue
                finished = item[0] in ("done", "error")
                yield item
                if finished:
                    return
    finally:
        if not finished:
            job.cancel()


async def final_event(job: Job, request: Request) -> tuple[Any, ...]:
    """The job's "done" event (intermediate chunks skipped); engine errors raise APIError."""
    async for event in job_events(job, request):
        if event[0] == "error":
            raise error_from_event(event[1])
        if event[0] == "done":
            return event
    raise APIError(499, "Client closed the request.", code="client_closed")


def token_piece(tokenizer: TextTokenizer, token: int) -> tuple[str, bytes]:
    """(how log-probabilities show a token, its bytes): its text, or when its bytes are not UTF-8 on
    their own (a byte of an Ethiopic letter) `bytes:\\xe1\\x88`, as vLLM writes it, so that such
    alternatives never collapse into one U+FFFD."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw), raw


def sse(payload: dict[str, Any] | str) -> dict[str, str]:
    """One server-sent event: `data: <json>` (or a literal like [DONE])."""
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}
