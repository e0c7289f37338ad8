"""The streamed wire format of both endpoints, event by event, as OpenAI's clients read it."""

from __future__ import annotations

import json
from typing import Any

import httpx2

import serve_helpers
from serve_helpers import CHAT, NAME, app_for, run

tokenizer = serve_helpers.bpe_512
model = serve_helpers.llama_512


PATHS = {
    "/v1/chat/completions": {"messages": CHAT},
    "/v1/completions": {"prompt": ["ሰላም", "ሰኞ"], "echo": True},
}


def events(raw: httpx2.AsyncClient, path: str, fields: dict[str, Any]) -> Any:
    """The JSON chunks of a stream (without the final [DONE], checked here)."""

    async def read() -> list[dict[str, Any]]:
        body = {"model": NAME, "max_tokens": 6, "seed": 3, "n": 2, "stream": True, **PATHS[path], **fields}
        text = (await raw.post(path, json=body)).text
        data = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(item) for item in data[:-1]]

    return read()


def test_usage_is_null_on_every_chunk_but_the_last_when_asked(model, tokenizer) -> None:
    """With `stream_options.include_usage` every chunk carries `usage` (null until the last, which has
    no choices), as OpenAI documents; completions chunks had no `usage` key at all. Without it, none
    has the key."""

    async def body(_: Any, raw: httpx2.AsyncClient) -> None:
        for path in PATHS:
            chunks = await events(raw, path, {"stream_options": {"include_usage": True}})
            *early, last = chunks
            assert all("usage" in chunk and chunk["usage"] is None for chunk in early), path
            assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0, path
            plain = await events(raw, path, {})
            assert all("usage" not in chunk for chunk in plain), path

    run(app_for(model, tokenizer), body)
