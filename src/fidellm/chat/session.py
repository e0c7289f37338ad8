"""A multi-turn chat with a loaded model: the memory behind `fidellm chat`, with no terminal code.

The history is rendered with the project's chat template (`render_chat`) every turn, so the model
sees exactly what an exported model sees through transformers, vLLM or llama.cpp. The history is kept
within the model's context: before each reply the oldest turn groups (a user message and the
assistant and tool messages that answer it) are dropped until the prompt plus `max_new_tokens` fits
`max_position_embeddings`; the system prompt and the tools are always kept. With tools, Hermes tool
calls in the reply are parsed as the server parses them (`fidellm.serve.tools`); the caller supplies
each call's result as a `tool` message and asks for the next reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from fidellm.chat.template import encode_chat, render_chat
from fidellm.data.readers import lone_surrogate
from fidellm.errors import FidelError
from fidellm.generate.engine import BatchDecoder, FinishReason, GenerationConfig, default_stop_ids
from fidellm.serve.tools import ParsedCall, ToolCallFilter, parse_tool_calls
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.special import IM_END, IM_END_ID

SAVE_FORMAT = "fidellm-chat"
SAVE_VERSION = 1
ROLES = ("user", "assistant", "tool")
"""Roles kept in the history; the system prompt is held apart so that trimming never drops it."""


@dataclass
class Reply:
    """One assistant reply: its text (None when it is only tool calls), its parsed tool calls, why
    generation ended, and how many old turns were dropped to fit the context before it."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    dropped: int = 0


def chat_generation_config(
    model: nn.Module, tokenizer: TextTokenizer, config: GenerationConfig
) -> GenerationConfig:
    """`config` for chat turns: the prompt carries its own `<|bos|>`, and a turn ends at `<|im_end|>`
    (its token id when the tokenizer has it, else the string, as for the byte tokenizer)."""
    stops = default_stop_ids(model, tokenizer)
    stop_strings = config.stop_strings
    if tokenizer.encode(IM_END) == [IM_END_ID]:
        stops += (IM_END_ID,)
    else:
        stop_strings += (IM_END,)
    return replace(config, stop_token_ids=stops, stop_strings=stop_strings, add_bos=False)


def read_tools(path: Path) -> list[dict[str, Any]]:
    """The tool schemas in a JSON file: a list of OpenAI function tools (`{"type": "function",
    "function": {"name": ..., "parameters": {...}}}`)."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FidelError(f"{path}: cannot read the tools file: {error}") from error
    _refuse_lone_surrogates(tools, path)
    return check_tools(tools, str(path))


def _refuse_lone_surrogates(value: Any, path: Path) -> None:
    """FidelError naming the file and field when parsed JSON holds a lone surrogate (JSON can escape one),
    which no tokenizer can encode: the chat would crash at its next reply."""
    surrogate = lone_surrogate(value)
    if surrogate:
        raise FidelError(f"{path}: {surrogate}, which UTF-8 cannot encode")


def check_tools(tools: Any, where: str) -> list[dict[str, Any]]:
    """`tools` if it is a list of function tools with string names; FidelError naming `where` if not."""
    if not isinstance(tools, list):
        raise FidelError(f"{where}: tools must be a JSON list of function tools, got {type(tools).__name__}")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise FidelError(
                f'{where}: tools[{index}] must be {{"type": "function", "function": {{"name": ..., ...}}}}'
            )
    return tools


class ChatSession:
    """The system prompt, the tools and the user/assistant/tool history of one conversation."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        config: GenerationConfig,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = chat_generation_config(model, tokenizer, config)
        self.context = int(model.config.max_position_embeddings)
        self.system = system or None
        self.tools = [dict(tool) for tool in tools] if tools else None
        self.messages: list[dict[str, Any]] = []
        self._check_room()

    def _check_room(self) -> None:
        """FidelError unless the system prompt, the tools and an empty message leave room for
        `max_new_tokens` in the context: else no message could ever be answered."""
        floor = len(self._render([{"role": "user", "content": ""}]))
        new_tokens = self.config.max_new_tokens
        if floor + new_tokens > self.context:
            room = self.context - floor
            advice = (
                f"use --max-new-tokens {room} or less"
                if room > 0
                else "shorten the system prompt or the tools"
            )
            raise FidelError(
                f"--max-new-tokens {new_tokens} leaves no room for a message: the chat prompt takes {floor}"
                f" tokens before any message is typed, and the model's context is {self.context} tokens;"
                f" {advice}"
            )

    def reset(self) -> None:
        """Forget the conversation; the system prompt and the tools stay."""
        self.messages.clear()

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_tool_result(self, call: ParsedCall, result: str) -> None:
        """The result of one of the last reply's tool calls, as the `tool` message that answers it."""
        self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})

    def discard_last_turn(self) -> None:
        """Drop the last turn group (an interrupted exchange), back to and including its user message."""
        starts = self._group_starts()
        del self.messages[starts[-1] if starts else 0 :]

    def _group_starts(self) -> list[int]:
        return [index for index, message in enumerate(self.messages) if message["role"] == "user"]

    def _render(self, messages: list[dict[str, Any]]) -> list[int]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        text = render_chat(system + messages, tools=self.tools, add_generation_prompt=True)
        return encode_chat(self.tokenizer, text)

    def fit(self) -> tuple[list[int], int]:
        """(prompt token ids, turn groups dropped): the oldest groups are dropped from the history until
        the prompt and `max_new_tokens` fit the context; the last group is never dropped."""
        budget = self.context - self.config.max_new_tokens
        for dropped, start in enumerate(sorted({0, *self._group_starts()})):
            ids = self._render(self.messages[start:])
            if len(ids) <= budget:
                del self.messages[:start]
                return ids, dropped
        raise FidelError(
            f"the system prompt, tools and last message take {len(ids)} tokens; with --max-new-tokens"
            f" {self.config.max_new_tokens} they exceed the model's context of {self.context} tokens"
            " (shorten the message or the system prompt, or lower --max-new-tokens)"
        )

    def respond(self, on_text: Callable[[str], None] = lambda text: None) -> Reply:
        """Generate the assistant's next turn, passing its text to `on_text` as it comes (tool calls
        held back), and add it to the history. With tools, its tool calls are parsed into `calls`."""
        if not self.messages or self.messages[-1]["role"] == "assistant":
            raise FidelError("nothing to reply to: add a user message or tool results first")
        ids, dropped = self.fit()
        decoder = BatchDecoder(self.model, self.tokenizer, [ids], self.config)
        tool_filter = ToolCallFilter() if self.tools else None
        while not decoder.done:
            chunk = decoder.step()[0]
            shown = tool_filter.feed(chunk) if tool_filter else chunk
            if shown:
                on_text(shown)
        result = decoder.results[0]
        content, calls = parse_tool_calls(result.text) if self.tools else (result.text, [])
        if tool_filter is not None:
            rest = tool_filter.flush() + ("" if calls else tool_filter.held)
            if rest:
                on_text(rest)  # a partial tag or a block that was not a valid call after all
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls
            ]
        self.messages.append(message)
        return Reply(content=content, calls=calls, finish_reason=result.finish_reason, dropped=dropped)

    def save(self, path: Path) -> None:
        """Write the conversation (system prompt, tools, history) as JSON, UTF-8, non-ASCII kept."""
        state = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "system": self.system,
            "tools": self.tools,
            "messages": self.messages,
        }
        try:
            Path(path).write_text(json.dumps(state, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as error:
            raise FidelError(f"{path}: cannot save the chat: {error}") from error

    def load(self, path: Path) -> None:
        """Replace the conversation with one written by `save`; the file is checked in full first, so a
        bad file leaves the session as it was."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FidelError(f"{path}: cannot read the chat file: {error}") from error
        _refuse_lone_surrogates(state, path)
        if not isinstance(state, dict) or state.get("format") != SAVE_FORMAT:
            raise FidelError(f'{path}: not a saved chat (expected "format": "{SAVE_FORMAT}")')
        if state.get("version") != SAVE_VERSION:
            raise FidelError(f"{path}: unsupported chat file version {state.get('version')!r}")
        system = state.get("system")
        if system is not None and not isinstance(system, str):
            raise FidelError(f"{path}: system must be a string or null")
        tools = state.get("tools")
        tools = check_tools(tools, str(path)) if tools is not None else None
        messages = state.get("messages")
        if not isinstance(messages, list):
            raise FidelError(f"{path}: messages must be a list")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise FidelError(f"{path}: messages[{index}] must be an object with a role in {ROLES}")
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise FidelError(f"{path}: messages[{index}].content must be a string or null")
        if messages:  # the template's own checks (tool-call shapes, arguments JSON)
            try:
                render_chat(messages, tools=tools)
            except FidelError as error:
                raise FidelError(f"{path}: {error}") from error
        self.system, self.tools, self.messages = system or None, tools, messages
