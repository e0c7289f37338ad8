"""The FastAPI app: routes, OpenAI-style errors for every failure, API keys, per-key rate limits, a
response cache for deterministic requests, a body size limit, and the chat page at `/`."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from fidellm.serve.cache import ResponseCache
from fidellm.serve.chat import chat_completion
from fidellm.serve.common import APIError, ServerState, ServeSettings
from fidellm.serve.completions import completion
from fidellm.serve.engine import Engine
from fidellm.serve.metrics import ServerMetrics
from fidellm.serve.ratelimit import RateLimitedError, RateLimiter, enforce
from fidellm.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    now,
)
from fidellm.serve.schemas import Request as RequestBody
from fidellm.tokenizer.base import TextTokenizer

STATIC = Path(__file__).parent / "static"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:;"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The chat page's Content-Security-Policy: only its own script and style run, requests go only to this
server, and no other site may frame it."""


class BodyLimit:
    """ASGI middleware: reads the whole request body first and answers 413 when it exceeds `limit`
    bytes (by Content-Length or by what actually arrives), so no handler ever parses an oversized body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"Request body is larger than {self.limit} bytes.", code="request_too_large")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _request_fields() -> frozenset[str]:
    """The field names of every request model: any other string in an error's location is the tag
    pydantic gives a union member (`str`, `list[constrained-int]`), which is not in the client's JSON."""
    names: set[str] = set()
    models: list[type[BaseModel]] = [RequestBody]
    while models:
        model = models.pop()
        names.update(model.model_fields)
        models.extend(model.__subclasses__())
    return frozenset(names)


REQUEST_FIELDS = _request_fields()


def _most_plausible(errors: Sequence[Any]) -> dict[str, Any]:
    """The error to report, from the first invalid field. A union reports every member's errors; the
    member that fits the input best is the one whose error is not a type mismatch (the list member for
    a list with a negative id), else the one that failed deepest; ties keep pydantic's order."""
    field = errors[0]["loc"][:2]
    return min(
        (error for error in errors if error["loc"][:2] == field),
        key=lambda error: (error["type"].endswith("_type"), -len(error["loc"])),
    )


def _locate(loc: Sequence[int | str]) -> tuple[str | None, str | None]:
    """(param, path) of an error's location as OpenAI writes them (`messages[0].content`), without
    union tags: path goes down to the failing value, param stops at the first union (its member is
    only a guess)."""
    path, param = "", None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in REQUEST_FIELDS:
            path += f".{part}" if path else part
        elif param is None:
            param = path
    return (path if param is None else param) or None, path or None


def _encodable(text: str) -> bool:
    """Whether `text` is valid Unicode: JSON may carry a lone UTF-16 surrogate (`"\\ud800"`), which
    no UTF-8 encoder, tokenizer or JSON response accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


Link = tuple[Any, int | str] | None
"""Where a value sits in a request: None at the top, else (the link of its container, its key)."""


def _path(link: Link) -> str:
    """`messages[0].content` of a `Link`."""
    keys: list[int | str] = []
    while link is not None:
        link, key = link
        keys.append(key)
    path = ""
    for key in reversed(keys):
        path += f"[{key}]" if isinstance(key, int) else f".{key}" if path else key
    return path


def lone_surrogate(value: Any) -> str | None:
    """The location (`messages[0].content`) of the first string in `value` (a dumped request) that is
    not `_encodable`, or of the object holding such a key; None when every string is valid. Walks with
    its own stack: a tool's `parameters` may nest deeper than Python's recursion limit allows."""
    stack: list[tuple[Any, Link]] = [(value, None)]
    while stack:
        item, link = stack.pop()
        if isinstance(item, str) and not _encodable(item):
            return _path(link)
        if isinstance(item, dict) and not all(_encodable(key) for key in item):
            return _path(link)
        children = (
            enumerate(item) if isinstance(item, list) else item.items() if isinstance(item, dict) else ()
        )
        nested = [(child, (link, key)) for key, child in children if isinstance(child, str | list | dict)]
        stack.extend(reversed(nested))
    return None


SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
"""A surrogate escaped in JSON (`\\ud800`) or encoded in the body's UTF-8 (json.loads takes those too)."""


def may_hold_surrogates(body: bytes) -> bool:
    """Whether the JSON `body` may decode to a string with a surrogate: the cheap test that spares
    nearly every request `lone_surrogate`'s walk (a body that is not UTF-8 is always walked)."""
    return json.detect_encoding(body) != "utf-8" or SURROGATE_BYTES.search(body) is not None


def _shown(value: Any) -> str:
    """' (got "5")' for a short scalar input, so that "5" sent for an integer reads as the string it
    is; '' for anything else. Non-ASCII text is shown as is unless it is not valid Unicode."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = json.dumps(value, ensure_ascii=isinstance(value, str) and not _encodable(value))
        if len(text) <= 40:
            return f" (got {text})"
    return ""


def _validation_error(error: RequestValidationError) -> APIError:
    """OpenAI answers schema violations with 400 invalid_request_error naming the parameter."""
    errors = error.errors()
    if not errors:
        return APIError(400, "Invalid request: malformed body")
    if errors[0].get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.")
    chosen = _most_plausible(errors)
    loc = chosen.get("loc", ())
    param, path = _locate(loc[1:] if loc[:1] == ("body",) else loc)
    where = f"{path}: " if path else ""
    message = f"Invalid request: {where}{chosen.get('msg', 'malformed body')}{_shown(chosen.get('input'))}"
    return APIError(400, message, param=param)


ERROR_STATUSES = {
    400: "Invalid request (OpenAI's invalid_request_error: bad JSON, wrong types, limits, context length).",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "Request body too large.",
    429: "Rate limit exceeded (see Retry-After).",
    503: "Request queue full.",
    504: "The request timed out.",
}


def documented(ok: type[BaseModel], *errors: int, stream: bool = False) -> dict[int | str, Any]:
    """OpenAPI `responses` of a route: the success body (and the SSE stream when `stream`) and the
    OpenAI-shaped errors it can answer with."""
    responses: dict[int | str, Any] = {
        code: {"model": ErrorBody, "description": ERROR_STATUSES[code]} for code in errors
    }
    success: dict[str, Any] = {"model": ok, "description": "Success."}
    if stream:
        success["description"] = "Success; with `stream`, server-sent events ending in `data: [DONE]`."
        event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
        success["content"] = {"text/event-stream": {"schema": event}}  # each event: JSON chunk or [DONE]
    responses[200] = success
    return responses


def without_422(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document without FastAPI's automatic 422 responses: validation errors are 400 here,
    as in OpenAI's API (documented per route)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    model: nn.Module,
    tokenizer: TextTokenizer,
    settings: ServeSettings,
    cache: ResponseCache | None = None,
    limiter: RateLimiter | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `model` under `settings.model_name`; `cache` None = no response
    cache, `limiter` None = no rate limit (it counts per API key, or per client address without keys)."""
    metrics = ServerMetrics()
    engine = Engine(
        model.eval(), tokenizer, settings.queue_size, metrics, settings.max_batch, settings.prefill_chunk
    )
    state = ServerState(model=model, tokenizer=tokenizer, settings=settings, engine=engine, cache=cache)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.stop()

    app = FastAPI(title="fidel-lm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        headers = error.headers if isinstance(error, RateLimitedError) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        failure = _validation_error(error)
        return JSONResponse(failure.body(), status_code=failure.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        failure = APIError(error.status_code, str(error.detail), code=None)
        return JSONResponse(failure.body(), status_code=error.status_code, headers=error.headers)

    keys = [key.encode("utf-8") for key in settings.api_keys]

    async def authorize(request: Request) -> None:
        """401 unless the request carries one of the keys. Compared as bytes (compare_digest refuses
        non-ASCII str): the header's bytes as sent (Starlette decodes them as Latin-1), the keys' UTF-8."""
        if not keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        sent = key.encode("latin-1")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(sent, k) for k in keys):
            raise APIError(
                401, "Incorrect or missing API key (Authorization: Bearer KEY).", code="invalid_api_key"
            )

    async def authorize_and_limit(request: Request) -> None:
        await authorize(request)
        if limiter is None:
            return
        if settings.api_keys:
            client = request.headers["authorization"].partition(" ")[2]
        else:
            client = request.client.host if request.client else "unknown"
        await enforce(limiter, client)

    def respond(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
        async def run(body: Any, request: Request) -> Response:
            where = lone_surrogate(body.model_dump()) if may_hold_surrogates(await request.body()) else None
            if where is not None:
                message = f"Invalid request: {where} holds a lone UTF-16 surrogate, which is not text."
                raise APIError(400, message, param=where)
            result = await handler(state, body, request)
            if hasattr(result, "__aiter__"):
                return EventSourceResponse(result, ping=15)
            return JSONResponse(result if isinstance(result, dict) else result.wire())  # a dict: a cache hit

        return run

    chat = respond(chat_completion)
    complete = respond(completion)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        """The chat page: public (it holds no secrets); its API calls carry the key the user types."""
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    limited = (401, 429)

    @app.get(
        "/v1/models", dependencies=[Depends(authorize_and_limit)], responses=documented(ModelList, *limited)
    )
    async def models() -> dict[str, Any]:
        card = ModelCard(id=settings.model_name, created=now(), max_model_len=state.context)
        return ModelList(data=[card]).wire()

    generation_errors = (400, 401, 404, 413, 429, 503, 504)

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(authorize_and_limit)],
        responses=documented(ChatCompletion, *generation_errors, stream=True),
    )
    async def chat_route(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat(body, request)

    @app.post(
        "/v1/completions",
        dependencies=[Depends(authorize_and_limit)],
        responses=documented(Completion, *generation_errors, stream=True),
    )
    async def completions_route(body: CompletionRequest, request: Request) -> Response:
        return await complete(body, request)

    app.openapi = lambda: without_422(app)  # type: ignore[method-assign]
    return app
