"""POST /v1/completions: text or token-id prompts, echo, and legacy logprobs (lm-eval's shape)."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from fidellm.generate.engine import GenerationResult
from fidellm.serve.cache import cache_key
from fidellm.serve.common import (
    APIError,
    ServerState,
    error_from_event,
    final_event,
    job_events,
    sse,
    token_piece,
)
from fidellm.serve.engine import Job, TokenScore
from fidellm.serve.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
    new_id,
    now,
)


def prompt_rows(state: ServerState, request: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """(token ids, echo text) per prompt. Text prompts get BOS, as the tokenizer's post-processor adds
    it for other servers; token-id prompts are used as given. Runs in a worker thread: tokenizing a
    body of megabytes takes seconds, during which the event loop keeps serving."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(item, int) for item in prompt):
        prompt = [prompt]
    ids, texts = [], []
    vocab = state.model.config.vocab_size
    for item in prompt:
        if isinstance(item, str):
            ids.append(state.tokenizer.encode(item, add_bos=True))
            texts.append(item)
            continue
        bad = [token for token in item if token >= vocab]
        if bad:
            raise APIError(
                400, f"prompt has token ids outside the vocabulary of {vocab}: {bad[:5]}", param="prompt"
            )
        ids.append(list(item))
        texts.append(state.tokenizer.decode(item, skip_special_tokens=True))
    return ids, texts


def legacy_logprobs(state: ServerState, scores: list[TokenScore], offset: int) -> CompletionLogprobs:
    """{tokens, token_logprobs, top_logprobs, text_offset}, tokens shown as `token_piece` does. Offsets
    are characters from the prompt text's start (where `offset` is): the character holding the token's
    first byte, counted over the decoded text (special tokens take no room there)."""
    tokenizer = state.tokenizer
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens, values, tops, offsets = [], [], [], []
    for token, logprob, top in scores:
        tokens.append(token_piece(tokenizer, token)[0])
        values.append(logprob)
        tops.append(None if top is None else {token_piece(tokenizer, i)[0]: v for i, v in top})
        offsets.append(offset)
        offset += len(text.decode(tokenizer.token_bytes(token, skip_special_tokens=True)))
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def usage_of(results: list[GenerationResult], n: int) -> Usage:
    prompt = sum(len(result.prompt_ids) for result in results[::n])
    completion = sum(len(result.token_ids) for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def completion(state: ServerState, request: CompletionRequest, http: Request) -> Any:
    """A Completion (choice i*n + j is prompt i's j-th sample; a cached one as its wire dict), or SSE
    events when `stream`."""
    state.check_model(request.model)
    if request.stream and request.logprobs is not None:
        raise APIError(400, "logprobs are not supported with stream on this server.", param="logprobs")
    ids, texts = await asyncio.to_thread(prompt_rows, state, request)
    requested = request.max_tokens
    if "max_tokens" not in request.model_fields_set and requested is not None:
        requested = min(requested, state.settings.max_tokens_cap)  # OpenAI's default 16, within our cap
    budget = state.budget(requested, [len(row) for row in ids], "max_tokens", "prompt")
    rows = [row for row in ids for _ in range(request.n)]
    config = state.generation_config(request, budget, rows=request.n) if budget > 0 else None
    shown = request.echo or request.logprobs is not None  # the text is echoed or sets the text offsets
    key = cache_key(
        "completions",
        request,
        config,
        prompts=ids,
        texts=texts if shown else None,
        n=request.n,
        echo=request.echo,
        logprobs=request.logprobs,
    )
    hit = await state.cached(key)
    if hit is not None:
        return hit
    echoes = [text for text in texts for _ in range(request.n)]
    job = Job(
        prompts=rows,
        config=config,
        timeout=state.settings.request_timeout_s,
        choices=request.n,
        score_from_start=request.echo,
        score_top=request.logprobs,
    )
    state.submit(job)
    if request.stream:
        return stream_completion(request, job, http, echoes)
    _, results, scores = await final_event(job, http)
    choices = []
    for index, result in enumerate(results):
        prefix = echoes[index] if request.echo else ""
        logprobs = None
        if scores is not None:
            logprobs = legacy_logprobs(state, scores[index], 0 if request.echo else len(echoes[index]))
        choices.append(
            CompletionChoice(
                index=index, text=prefix + result.text, logprobs=logprobs, finish_reason=result.finish_reason
            )
        )
    reply = Completion(
        id=new_id("cmpl"),
        created=now(),
        model=request.model,
        choices=choices,
        usage=usage_of(results, request.n),
    )
    await state.remember(key, reply)
    return reply


async def stream_completion(
    request: CompletionRequest, job: Job, http: Request, echoes: list[str]
) -> AsyncIterator[dict[str, str]]:
    """SSE events: text deltas per choice (the echoed prompt first), a finish chunk each, the usage
    chunk when asked (every other chunk then has `"usage": null`, as OpenAI's), [DONE]."""
    base: dict[str, Any] = dict(id=new_id("cmpl"), created=now(), model=request.model)
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, finish: str | None) -> dict[str, str]:
        choice = CompletionChoice(index=index, text=text, logprobs=None, finish_reason=finish)
        return sse(Completion(**base, choices=[choice], **extra).wire())

    if request.echo:
        for index, text in enumerate(echoes):
            yield chunk(index, text, None)
    async for event in job_events(job, http):
        if event[0] == "error":
            yield sse(error_from_event(event[1]).body())
            break
        if event[0] == "chunks":
            for index, text in enumerate(event[1]):
                if text:
                    yield chunk(index, text, None)
            continue
        results: list[GenerationResult] = event[1]
        for index, result in enumerate(results):
            yield chunk(index, "", result.finish_reason)
        if include_usage:
            yield sse(Completion(**base, choices=[], usage=usage_of(results, request.n)).wire())
        break
    yield sse("[DONE]")
