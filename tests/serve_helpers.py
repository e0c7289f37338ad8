"""What the server tests share: the tiny random Llamas and FLORES-200 Amharic BPEs they serve, the app
they build around them, and a client run against it in-process.

The models and tokenizers are module-scoped fixtures; a test module binds each one it needs under the
name its tests use (`tokenizer = serve_helpers.bpe_768`), and pytest then builds it once for that
module, as a fixture defined there (no conftest, so no other test module sees them)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx2
import openai
import pytest
from fastapi import FastAPI
from torch import Tensor, nn

from fidellm.models.llama import LlamaForCausalLM, LMOutput
from fidellm.serve.app import create_app
from fidellm.serve.cache import ResponseCache
from fidellm.serve.common import ServeSettings
from fidellm.serve.ratelimit import RateLimiter
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.bpe import BPETokenizer
from fixtures.bpe import flores_bpe
from fixtures.models import WrappedLM, gqa_config, random_llama

NAME = "tiny"
CHAT = [{"role": "system", "content": "አንተ አጋዥ ረዳት ነህ።"}, {"role": "user", "content": "ሰላም፣ እንዴት ነህ?"}]
T = TypeVar("T")


def tiny_llama(vocab: int, context: int, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama (`fixtures.models`); the same vocab, layers and seed give the same weights
    whatever the context."""
    config = gqa_config(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=context)
    return random_llama(config, seed=seed)


@pytest.fixture(scope="module")
def bpe_768(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    """768 tokens, trained on all of FLORES-200 Amharic dev."""
    return flores_bpe(tmp_path_factory.mktemp("tokenizer"), 768)


@pytest.fixture(scope="module")
def bpe_512(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    """512 tokens, trained on the first 400 lines of FLORES-200 Amharic dev (faster to train)."""
    return flores_bpe(tmp_path_factory.mktemp("tokenizer"), 512, lines=400)


@pytest.fixture(scope="module")
def llama_768() -> LlamaForCausalLM:
    """For `bpe_768` or `bpe_512`: 768 ids, a context of 1024."""
    return tiny_llama(768, 1024)


@pytest.fixture(scope="module")
def llama_512() -> LlamaForCausalLM:
    """For `bpe_512`: 512 ids, a context of 128 (short enough for a prompt to exceed it)."""
    return tiny_llama(512, 128)


class ScriptedModel(WrappedLM):
    """Wraps a model so that decoding emits `script` token by token (prefill = step 0), whatever the
    weights say; plain forward passes (scoring) are untouched. Drives tool-call outputs."""

    def __init__(self, inner: LlamaForCausalLM, script: list[int]):
        super().__init__(inner)
        self.script, self.step = script, 0

    def new_cache(self) -> Any:
        self.step = 0
        return self.inner.new_cache()

    def adjust(self, input_ids: Tensor, cache: Any, output: LMOutput) -> LMOutput:
        logits = output.logits.clone()
        if cache is not None:
            logits[:, -1] = float("-inf")
            logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 0.0
            self.step += 1
        return LMOutput(logits)


def app_for(
    model: nn.Module,
    tokenizer: TextTokenizer,
    cache: ResponseCache | None = None,
    limiter: RateLimiter | None = None,
    **settings: Any,
) -> FastAPI:
    """The app serving `model` as NAME, with a max_tokens cap of 64 unless `settings` give another."""
    config = ServeSettings(model_name=NAME, **{"max_tokens_cap": 64, **settings})
    return create_app(model, tokenizer, config, cache=cache, limiter=limiter)


def run(
    app: FastAPI, body: Callable[[openai.AsyncOpenAI, httpx2.AsyncClient], Awaitable[T]], key: str = "k"
) -> T:
    """Run `body` with an openai client and a raw client, both wired to `app` in-process."""

    async def main() -> T:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://serve") as raw:
            client = openai.AsyncOpenAI(
                base_url="http://serve/v1", api_key=key, http_client=raw, max_retries=0
            )
            return await body(client, raw)

    return asyncio.run(main())


def error_of(response: httpx2.Response) -> dict[str, Any]:
    """The error of an OpenAI-shaped error body (checked to have exactly OpenAI's keys)."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets) in `text`."""
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )
