"""Schemathesis against the OpenAPI schema `fidellm serve` publishes (`/openapi.json`): requests generated
from it, valid and invalid (every phase: examples, coverage, fuzzing), never get a 5xx, and responses
match what the schema documents. The app runs under uvicorn on loopback (the engine binds its queue to
the serving loop) with a tiny random Llama, a BPE trained on FLORES-200 Amharic dev, an API key, a rate
limiter and the response cache, as `fidellm serve` sets them up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
import torch
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import serve_helpers
from fidellm.serve.cache import InProcessLRU
from fidellm.serve.ratelimit import TokenBucket
from fidellm.tokenizer.bpe import BPETokenizer
from fixtures.server import loopback
from serve_helpers import NAME, app_for, tiny_llama

API_KEY = "schemathesis-key"
MAX_TOKENS_CAP = 16  # the completions default (OpenAI's 16) must fit, or every default request is a 400
FUZZED_PER_OPERATION = 30


tokenizer = serve_helpers.bpe_768


@pytest.fixture(scope="module")
def base_url(tokenizer: BPETokenizer) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) in a background thread."""
    limiter = TokenBucket(rpm=60_000, burst=10_000)  # consulted on every request, never refuses here
    app = app_for(
        tiny_llama(768, 256),
        tokenizer,
        cache=InProcessLRU(64),
        limiter=limiter,
        max_tokens_cap=MAX_TOKENS_CAP,
        api_keys=(API_KEY,),
        request_timeout_s=30,
    )
    with loopback(app) as base:
        yield base


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> schemathesis.BaseSchema:
    """The served schema; a fixed seed makes the generated requests the same on every run, and reports
    show request bodies unfiltered (schemathesis hides fields like `max_tokens` by default)."""
    config = schemathesis.Config.from_dict({"seed": 20240601, "output": {"sanitization": {"enabled": False}}})
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)


@pytest.fixture(scope="module", autouse=True)
def subnormal_floats() -> None:
    """Older torch releases' inductor (2.4 and 2.5 at least) links its CPU kernels with -ffast-math, which
    turns subnormal floats off for the whole process once any earlier test has compiled one; hypothesis
    then refuses to generate floats. Turn them back on (a no-op where nothing turned them off)."""
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's from_fixture reads `request.node._nodeid`, which pytest 9 no longer sets (node
    ids derive from `_id`); give it the id it expects."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=FUZZED_PER_OPERATION, deadline=None, database=None)
def test_no_server_errors(case: schemathesis.Case) -> None:
    """Generated bodies name the served model, so valid requests reach tokenization and generation
    instead of stopping at 404 model_not_found."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body = {**case.body, "model": NAME}
    case.call_and_validate(
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
        checks=[
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
            content_type_conformance,
        ],
    )
