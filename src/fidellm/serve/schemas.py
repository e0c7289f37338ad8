"""Pydantic v2 models of the OpenAI wire format: requests are validated with them (unknown fields are
ignored, as OpenAI-compatible servers do; JSON types are strict, as OpenAI's are), responses are built
from them and dumped with `exclude_unset`, so an optional field is on the wire exactly when the server
set it (null included)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fidellm.generate.config import SEED_MAX, SEED_MIN

MAX_STOP = 16
"""OpenAI takes 4 stop strings, vLLM any number; lm-eval's local-completions sends a task's whole
`until` list plus the EOS text (5 for gsm8k_cot), so 4 would refuse its generation requests."""
MAX_N = 8

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
StopText = Annotated[str, Field(min_length=1)]


class Request(BaseModel):
    """Base of request bodies: extra fields are accepted and ignored. Strict types, as OpenAI's API
    answers "5" for an integer or "yes" for a boolean with a 400 instead of converting it; an integer
    is still a number (temperature 1). A null for an optional field with a default (`"n": null`,
    `"stream": null`) is that default: OpenAI's spec makes them nullable and clients send nulls."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = {
            name
            for name, info in cls.model_fields.items()
            if not info.is_required() and type(None) not in get_args(info.annotation)
        }
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}


class StreamOptions(Request):
    include_usage: bool = False


class SamplingFields(Request):
    """Fields that chat and completion requests share."""

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(Request):
    type: Literal["text"]
    text: str


class FunctionCall(Request):
    name: str
    arguments: str


class ToolCall(Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSpec(Request):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)
        ]
    )
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class Response(BaseModel):
    """Base of response bodies: fields with a non-None default (object, role, type) always go out;
    None-default fields only when set."""

    def model_post_init(self, context: Any, /) -> None:
        fields = type(self).model_fields
        self.model_fields_set.update(name for name, info in fields.items() if info.default is not None)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Response):
    content: list[TokenLogprob] | None = None


class ChatChoice(Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class Delta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Response):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Response):
    """The legacy shape lm-eval's local-completions backend reads."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fidel-lm"
    max_model_len: int | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Response):
    error: ErrorDetail
