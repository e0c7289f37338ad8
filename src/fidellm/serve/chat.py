"""POST /v1/chat/completions: the chat template, Hermes tool calls, n choices, streaming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from fidellm.chat.template import encode_chat, render_chat
from fidellm.errors import FidelError
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
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCall,
    FunctionDelta,
    NamedToolChoice,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from fidellm.serve.tools import ParsedCall, ToolCallFilter, parse_tool_calls
from fidellm.tokenizer.special import TOOL_CALL_START


def forced_prefix(request: ChatCompletionRequest) -> str:
    """Text appended after the generation prompt: `required` starts a call, a named choice starts a
    call to that function (the model then writes the arguments; the name is JSON-escaped, so a quote or
    backslash in it still parses). '' otherwise."""
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        name = json.dumps(choice.function.name, ensure_ascii=False)
        return f'{TOOL_CALL_START}{{"name": {name}, "arguments": '
    return TOOL_CALL_START if choice == "required" else ""


def check_tools(request: ChatCompletionRequest) -> bool:
    """Whether tool calls are parsed from the output; a tool_choice that names no given tool is a 400."""
    choice = request.tool_choice
    if choice is not None and choice != "none" and not request.tools:
        raise APIError(400, "tool_choice needs tools to be given.", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = {tool.function.name for tool in request.tools or []}
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names '{choice.function.name}', which is not in tools.",
                param="tool_choice",
            )
    return bool(request.tools) and choice != "none"


def chat_prompt(state: ServerState, request: ChatCompletionRequest) -> tuple[str, list[int]]:
    """(forced prefix, prompt token ids) of the rendered chat. Runs in a worker thread: rendering and
    tokenizing a body of megabytes takes seconds, during which the event loop keeps serving."""
    messages = [message.model_dump(exclude_none=True) for message in request.messages]
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    try:
        text = render_chat(messages, tools=tools or None, add_generation_prompt=True)
    except FidelError as error:
        raise APIError(400, str(error), param="messages") from error
    prefix = forced_prefix(request)
    return prefix, encode_chat(state.tokenizer, text + prefix)


def logprob_content(state: ServerState, scores: list[TokenScore]) -> ChoiceLogprobs:
    """Chat-style logprobs: one entry per generated token with its top alternatives, each with the
    token's own bytes (`token_piece`)."""
    content = []
    for token, logprob, top in scores:
        text, raw = token_piece(state.tokenizer, token)
        alternatives = []
        for other, value in top or []:
            other_text, other_raw = token_piece(state.tokenizer, other)
            alternatives.append(TopLogprob(token=other_text, logprob=value, bytes=list(other_raw)))
        entry = TokenLogprob(token=text, logprob=logprob or 0.0, bytes=list(raw), top_logprobs=alternatives)
        content.append(entry)
    return ChoiceLogprobs(content=content)


def calls_in(text: str, parallel: bool) -> tuple[str | None, list[ParsedCall]]:
    """The content and tool calls of `text` (`parse_tool_calls`); only the first call when the request
    set `parallel_tool_calls` false, as OpenAI and vLLM answer (the others are dropped)."""
    content, calls = parse_tool_calls(text)
    return content, calls if parallel else calls[:1]


def build_choice(
    index: int, text: str, finish: str, tools: bool, parallel: bool, logprobs: ChoiceLogprobs | None
) -> ChatChoice:
    """Choice `index` of a reply: its text, and its tool calls when `tools` are active (`calls_in`)."""
    content, calls = calls_in(text, parallel) if tools else (text, [])
    message = ResponseMessage(content=content)
    if calls:
        message.tool_calls = [
            ToolCall(
                id=call.id, type="function", function=FunctionCall(name=call.name, arguments=call.arguments)
            )
            for call in calls
        ]
        finish = "tool_calls"
    return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish)


def usage_of(results: list[GenerationResult]) -> Usage:
    prompt = len(results[0].prompt_ids)
    completion = sum(len(result.token_ids) for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def chat_completion(state: ServerState, request: ChatCompletionRequest, http: Request) -> Any:
    """A ChatCompletion (a cached one as its wire dict), or an async iterator of SSE events when
    `stream`."""
    state.check_model(request.model)
    tools_active = check_tools(request)
    if request.top_logprobs is not None and not request.logprobs:  # else silently no logprobs at all
        raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
    if request.stream and request.logprobs:
        raise APIError(400, "logprobs are not supported with stream on this server.", param="logprobs")
    prefix, ids = await asyncio.to_thread(chat_prompt, state, request)
    if request.max_completion_tokens is not None:
        requested, param = request.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = request.max_tokens, "max_tokens"
    if requested == 0:
        raise APIError(400, f"{param} must be at least 1.", param=param)
    budget = state.budget(requested, [len(ids)], param, "messages")
    config = state.generation_config(request, budget, rows=request.n, chat=True)
    score_top = (request.top_logprobs or 0) if request.logprobs else None
    key = cache_key(
        "chat",
        request,
        config,
        prompt=ids,
        prefix=prefix,
        n=request.n,
        logprobs=score_top,
        parallel_tool_calls=request.parallel_tool_calls if tools_active else None,
    )
    hit = await state.cached(key)
    if hit is not None:
        return hit
    job = Job(
        prompts=[ids] * request.n,
        config=config,
        timeout=state.settings.request_timeout_s,
        choices=request.n,
        score_top=score_top,
    )
    state.submit(job)
    if request.stream:
        return stream_chat(state, request, job, http, prefix, tools_active)
    _, results, scores = await final_event(job, http)
    choices = [
        build_choice(
            index,
            prefix + result.text,
            result.finish_reason,
            tools_active,
            request.parallel_tool_calls,
            logprob_content(state, scores[index]) if scores is not None else None,
        )
        for index, result in enumerate(results)
    ]
    reply = ChatCompletion(
        id=new_id("chatcmpl"), created=now(), model=request.model, choices=choices, usage=usage_of(results)
    )
    await state.remember(key, reply)
    return reply


async def stream_chat(
    state: ServerState, request: ChatCompletionRequest, job: Job, http: Request, prefix: str, tools: bool
) -> AsyncIterator[dict[str, str]]:
    """SSE events: a role delta per choice, content deltas, tool-call deltas (id and name, then the
    arguments), a finish chunk per choice, the usage chunk when asked, then [DONE]."""
    base: dict[str, Any] = dict(id=new_id("chatcmpl"), created=now(), model=request.model)
    include_usage = request.stream_options is not None and request.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}

    def chunk(choice: ChunkChoice) -> dict[str, str]:
        return sse(ChatCompletionChunk(**base, choices=[choice], **extra).wire())

    n = request.n
    filters = [ToolCallFilter() if tools else None for _ in range(n)]
    for index in range(n):
        yield chunk(ChunkChoice(index=index, delta=Delta(role="assistant", content=""), finish_reason=None))
    pending = [prefix] * n  # a forced prefix goes through the same path as generated text
    async for event in job_events(job, http):
        if event[0] == "error":
            yield sse(error_from_event(event[1]).body())
            break
        if event[0] == "chunks":
            for index, text in enumerate(event[1]):
                text, pending[index] = pending[index] + text, ""
                tool_filter = filters[index]
                shown = tool_filter.feed(text) if tool_filter else text
                if shown:
                    yield chunk(ChunkChoice(index=index, delta=Delta(content=shown), finish_reason=None))
            continue
        results: list[GenerationResult] = event[1]
        for index, result in enumerate(results):
            finish: str = result.finish_reason
            tool_filter = filters[index]
            if tool_filter is not None:
                rest = tool_filter.flush() + pending[index]
                calls = (
                    calls_in(tool_filter.held, request.parallel_tool_calls)[1] if tool_filter.in_call else []
                )
                if tool_filter.in_call and not calls:
                    rest += tool_filter.held  # not a valid call after all: it was content
                if rest:
                    yield chunk(ChunkChoice(index=index, delta=Delta(content=rest), finish_reason=None))
                for number, call in enumerate(calls):
                    head = ToolCallDelta(
                        index=number,
                        id=call.id,
                        type="function",
                        function=FunctionDelta(name=call.name, arguments=""),
                    )
                    body = ToolCallDelta(index=number, function=FunctionDelta(arguments=call.arguments))
                    for delta in (head, body):
                        yield chunk(
                            ChunkChoice(index=index, delta=Delta(tool_calls=[delta]), finish_reason=None)
                        )
                if calls:
                    finish = "tool_calls"
            yield chunk(ChunkChoice(index=index, delta=Delta(), finish_reason=finish))
        if include_usage:
            yield sse(ChatCompletionChunk(**base, choices=[], usage=usage_of(results)).wire())
        break
    yield sse("[DONE]")
