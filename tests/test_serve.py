"""The OpenAI-compatible server (`fidellm serve`), driven by the official `openai` client in-process
through an ASGI transport, with a tiny random Llama and a BPE trained on FLORES-200 Amharic dev."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx2
import openai
import pytest
import torch

import serve_helpers
from fidellm.models.llama import LlamaForCausalLM
from fidellm.tokenizer.bpe import BPETokenizer
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.special import IM_END_ID
from fixtures.chats import WEATHER_TOOL
from fixtures.server import loopback
from serve_helpers import CHAT, NAME, ScriptedModel, app_for, error_of, metric, run, tiny_llama

tokenizer = serve_helpers.bpe_768
model = serve_helpers.llama_768


def test_models_health_and_plain_chat(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        assert (await raw.get("/health")).json() == {"status": "ok"}
        models = await client.models.list()
        assert [m.id for m in models.data] == [NAME]
        reply = await client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, seed=3, n=2)
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert [c.index for c in reply.choices] == [0, 1]
        for choice in reply.choices:
            assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
            assert choice.message.tool_calls is None
        assert reply.choices[0].message.content != reply.choices[1].message.content  # seeds 3 and 4
        assert reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 10
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        again = await client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, seed=3)
        assert again.choices[0].message.content == reply.choices[0].message.content
        greedy = await client.chat.completions.create(
            model=NAME, messages=CHAT, max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=2
        )
        entries = greedy.choices[0].logprobs.content
        assert len(entries) == greedy.usage.completion_tokens
        for entry in entries:  # greedy: the chosen token is the most likely one
            assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(
                entry.top_logprobs[0].logprob
            )

    run(app, body)


def test_stream_reassembles_to_the_same_text(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        args: dict[str, Any] = dict(model=NAME, messages=CHAT, max_tokens=40, seed=11, temperature=1.0)
        whole = await client.chat.completions.create(**args)
        stream = await client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        # a character split across chunks would decode to extra U+FFFD and break this equality
        assert "".join(pieces) == whole.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        text = (await raw.post("/v1/chat/completions", json={**args, "stream": True})).text
        events = [line for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3

    run(app, body)


def scripted(model: LlamaForCausalLM, tokenizer: BPETokenizer, text: str) -> ScriptedModel:
    return ScriptedModel(model, [*tokenizer.encode(text), IM_END_ID])


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "አዲስ አበባ", "days": 2}}</tool_call>'


def test_tool_call_is_parsed_plain_and_streamed(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(scripted(model, tokenizer, "እሺ።\n" + CALL), tokenizer, max_tokens_cap=256)
    question = [{"role": "user", "content": "በአዲስ አበባ የአየር ሁኔታ?"}]

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        args: dict[str, Any] = dict(model=NAME, messages=question, tools=[WEATHER_TOOL], max_tokens=200)
        reply = await client.chat.completions.create(**args)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "እሺ።"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "አዲስ አበባ", "days": 2}
        stream = await client.chat.completions.create(**args, stream=True)
        chunks = [chunk async for chunk in stream]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert content == "እሺ።\n" and deltas[0].id and deltas[0].function.name == "get_weather"
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(
            call.function.arguments
        )
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        plain = await client.chat.completions.create(**args, tool_choice="none")  # not parsed
        assert (
            plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content
        )

    run(app, body)


def test_parallel_tool_calls_false_keeps_only_the_first_call(model, tokenizer) -> None:
    """The model writes two calls; with `parallel_tool_calls` false the reply has only the first, plain
    and streamed, as OpenAI and vLLM answer (the field was accepted and ignored: both came back)."""
    second = CALL.replace("get_weather", "get_time")
    app = app_for(scripted(model, tokenizer, CALL + "\n" + second), tokenizer, max_tokens_cap=256)

    async def body(client: openai.AsyncOpenAI, _: Any) -> None:
        question = [{"role": "user", "content": "ሰዓትና የአየር ሁኔታ?"}]
        args: dict[str, Any] = dict(model=NAME, messages=question, tools=[WEATHER_TOOL], max_tokens=200)
        both = await client.chat.completions.create(**args)
        assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
        one = await client.chat.completions.create(**args, parallel_tool_calls=False)
        assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
        assert one.choices[0].finish_reason == "tool_calls"
        stream = await client.chat.completions.create(**args, parallel_tool_calls=False, stream=True)
        deltas = [
            d for c in [c async for c in stream] if c.choices for d in c.choices[0].delta.tool_calls or []
        ]
        assert [d.function.name for d in deltas if d.function.name] == ["get_weather"]

    run(app, body)


def test_named_tool_choice_forces_the_call(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(scripted(model, tokenizer, '{"city": "ጎንደር"}}</tool_call>'), tokenizer)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        reply = await client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": [{"type": "text", "text": "ጎንደር?"}]}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "ጎንደር"}
        # a name that JSON must escape: the forced `{"name": "..."` was broken JSON, so no call came back
        odd = 'የአየር "ሁኔታ" \\ ትንበያ'
        tool = {"type": "function", "function": {**WEATHER_TOOL["function"], "name": odd}}
        reply = await client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "ጎንደር?"}],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": odd}},
        )
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == odd and reply.choices[0].finish_reason == "tool_calls"

    run(app, body)


def test_completions_echo_and_logprobs(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer)
    ids = tokenizer.encode("ኢትዮጵያ ውብ አገር ናት።", add_bos=True)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        scored = await client.completions.create(
            model=NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=1
        )
        logprobs = scored.choices[0].logprobs
        assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and all(len(t) == 1 for t in logprobs.top_logprobs[1:])
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        expected = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert logprobs.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
        assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
        generated = await client.completions.create(
            model=NAME, prompt=["ሰላም", "ኢትዮጵያ"], max_tokens=4, temperature=0, logprobs=2, n=2
        )
        assert [c.index for c in generated.choices] == [0, 1, 2, 3]
        for choice in generated.choices:
            assert choice.logprobs.token_logprobs[0] is not None and len(choice.logprobs.tokens) <= 4
        assert generated.choices[0].text == generated.choices[1].text  # greedy: samples agree
        echoed = await client.completions.create(model=NAME, prompt="ሰላም", max_tokens=3, echo=True, seed=1)
        assert echoed.choices[0].text.startswith("ሰላም")
        stream = await client.completions.create(model=NAME, prompt="ሰላም", max_tokens=3, seed=1, stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        assert "ሰላም" + text == echoed.choices[0].text

    run(app, body)


def test_errors_are_openai_shaped(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer, max_body_bytes=20_000)
    chat = {"model": NAME, "messages": CHAT}
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        post = raw.post
        cases: list[tuple[httpx2.Response, int, str | None]] = [
            (
                await post(
                    "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
                ),
                400,
                None,
            ),
            (await post("/v1/chat/completions", json={**chat, "max_tokens": "many"}), 400, "max_tokens"),
            (await post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages"),
            (await post("/v1/chat/completions", json={**chat, "max_tokens": 65}), 400, "max_tokens"),
            (await post("/v1/chat/completions", json={**chat, "top_p": -0.5}), 400, "top_p"),
            (await post("/v1/chat/completions", json={**chat, "temperature": -1}), 400, "temperature"),
            (
                await post(
                    "/v1/chat/completions",
                    content=json.dumps({**chat, "temperature": float("nan")}).encode(),  # NaN literal
                    headers={"content-type": "application/json"},
                ),
                400,
                "temperature",
            ),
            (
                await post(
                    "/v1/chat/completions", json={**chat, "messages": [{"role": "robot", "content": "x"}]}
                ),
                400,
                "messages[0].role",
            ),
            (
                await post("/v1/chat/completions", json={**chat, "tool_choice": "required"}),
                400,
                "tool_choice",
            ),
            (await post("/v1/chat/completions", json={**chat, "stop": ""}), 400, "stop"),
            (
                await post("/v1/completions", json={"model": NAME, "prompt": [[1, 2, vocab + 5]]}),
                400,
                "prompt",
            ),
            (await post("/v1/completions", json={"model": NAME, "prompt": "x" * 30_000}), 413, None),
            (await post("/v1/completions", json={"model": NAME, "prompt": [5] * context}), 400, "prompt"),
            (
                await post(
                    "/v1/completions", json={"model": NAME, "prompt": [5] * (context - 10), "max_tokens": 20}
                ),
                400,
                "max_tokens",
            ),
            (await post("/v1/chat/completions", json={**chat, "model": "gpt-4"}), 404, "model"),
            (await raw.get("/v1/nothing"), 404, None),
        ]
        for response, status, param in cases:
            error = error_of(response)
            assert response.status_code == status, (error, status)
            assert error["message"] and error["type"]
            if param is not None:
                assert error["param"] == param, error
        assert error_of(cases[-2][0])["code"] == "model_not_found"
        assert error_of(cases[-3][0])["code"] == "context_length_exceeded"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="other", messages=CHAT)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=1000)

    run(app, body)


def test_api_key_and_full_queue(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer, api_keys=("secret",), queue_size=1)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
        assert (await raw.get("/health")).status_code == 200  # health and metrics stay open
        good = openai.AsyncOpenAI(
            base_url="http://serve/v1", api_key="secret", http_client=raw, max_retries=0
        )
        requests = [good.chat.completions.create(model=NAME, messages=CHAT, max_tokens=30) for _ in range(4)]
        outcomes = await asyncio.gather(*requests, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
        assert refused and all(o.status_code == 503 for o in refused)  # one runs, one waits, others refused
        assert any(not isinstance(o, BaseException) for o in outcomes)

    run(app, body, key="wrong")


def test_metrics_move(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> str:
        before = (await raw.get("/metrics")).text
        reply = await client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, seed=0)
        after = (await raw.get("/metrics")).text
        assert (
            metric(after, "fidellm:prompt_tokens_total") - metric(before, "fidellm:prompt_tokens_total")
            == reply.usage.prompt_tokens
        )
        assert metric(after, "fidellm:generation_tokens_total") == reply.usage.completion_tokens
        assert metric(after, "fidellm:time_to_first_token_seconds_count") == 1
        assert metric(after, "fidellm:e2e_request_latency_seconds_count") == 1
        assert metric(after, "fidellm:inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
        assert (
            metric(after, "fidellm:num_requests_running") == 0
            and metric(after, "fidellm:num_requests_waiting") == 0
        )
        return after

    run(app, body)


def test_timeout_is_a_504(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    app = app_for(model, tokenizer, request_timeout_s=1e-9)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        response = await raw.post("/v1/chat/completions", json={"model": NAME, "messages": CHAT})
        assert response.status_code == 504 and error_of(response)["code"] == "timeout"

    run(app, body)


def test_uvicorn_stream_and_disconnect_cancels(model: LlamaForCausalLM, tokenizer: BPETokenizer) -> None:
    """Over real HTTP on loopback: a client that leaves mid-stream frees the worker for the next one."""
    app = app_for(model, tokenizer, max_tokens_cap=model.config.max_position_embeddings)
    with loopback(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=30)
        stream = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=900, stream=True)
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
        stream.close()  # the client goes away after a few tokens
        engine = app.state.server.engine
        freed_by = time.monotonic() + 5  # noticed within one disconnect poll, then dropped at the next step
        while (engine.running or engine.active_rows) and time.monotonic() < freed_by:
            time.sleep(0.05)
        assert not engine.running and engine.active_rows == 0, "the abandoned sequence still holds its slot"
        assert metric(httpx2.get(base + "/metrics").text, "fidellm:num_requests_running") == 0
        started = time.monotonic()
        reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - started < 10  # not stuck behind the abandoned 900-token stream
        metrics = httpx2.get(base + "/metrics").text
        assert metric(metrics, "fidellm:generation_tokens_total") == reply.usage.completion_tokens


def test_default_completion_length_stays_within_a_small_cap(model, tokenizer) -> None:
    """OpenAI's default max_tokens (16) is cut to a smaller --max-tokens-cap; asking for 16 is a 400."""
    app = app_for(model, tokenizer, max_tokens_cap=8)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        reply = await client.completions.create(model=NAME, prompt="ሰላም", temperature=0)
        assert reply.usage.completion_tokens <= 8
        response = await raw.post("/v1/completions", json={"model": NAME, "prompt": "ሰላም", "max_tokens": 16})
        assert response.status_code == 400 and error_of(response)["param"] == "max_tokens"

    run(app, body)


def test_a_reply_cut_by_max_tokens_ends_at_a_whole_character() -> None:
    """A byte model's max_tokens counts bytes: a reply cut inside a 3-byte letter ends before that
    letter, not in U+FFFD (as vLLM's detokenizer does), streamed or not; usage counts every byte."""
    inner = tiny_llama(256, 512, layers=1)
    app = app_for(ScriptedModel(inner, list("ሰላም".encode())), ByteTokenizer())
    chat: dict[str, Any] = dict(model=NAME, messages=[{"role": "user", "content": "ሰላም"}], max_tokens=5)

    async def body(client: openai.AsyncOpenAI, raw: httpx2.AsyncClient) -> None:
        reply = await client.chat.completions.create(**chat)
        assert reply.choices[0].message.content == "ሰ" and reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 5
        chunks = [c async for c in await client.chat.completions.create(**chat, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ሰ"
        plain = await client.completions.create(model=NAME, prompt="ሰላም", max_tokens=8)
        assert plain.choices[0].text == "ሰላ" and plain.usage.completion_tokens == 8
        streamed = await client.completions.create(model=NAME, prompt="ሰላም", max_tokens=8, stream=True)
        assert "".join([c.choices[0].text async for c in streamed]) == "ሰላ"

    run(app, body)
