"""The conversation schema every chat record is converted to, and its validation.

A conversation is one JSON object per line:

    {"id": "<source>/<record id>", "source": "<registry name>",
     "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}, ...]}  # optional

OpenAI-style: an assistant message may carry `tool_calls`, each
`{"type": "function", "function": {"name": ..., "arguments": "<JSON object as a string>"}}` (the OpenAI
wire form; written with `json.dumps(..., ensure_ascii=False)` so it renders exactly like a dict through
`render_chat`), and may then have empty content. Order: an optional system message, then a user turn;
an assistant turn follows a user or tool turn; tool turns follow an assistant turn with tool calls; the
last message is the assistant's (what SFT trains on). Every conversation must render with `render_chat`.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fidellm.chat.template import render_chat
from fidellm.errors import FidelError

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "tool_calls", "name", "tool_call_id"}


@dataclass
class Conversation:
    """One conversation; `group` keeps related conversations (both directions of a translation pair) in
    the same train/eval split and is not written out."""

    id: str
    source: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    group: str | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "source": self.source, "messages": self.messages}
        if self.tools:
            record["tools"] = self.tools
        return record


def _check_tool_calls(where: str, calls: Any, tool_names: set[str] | None) -> str | None:
    if not isinstance(calls, list) or not calls:
        return f"{where}.tool_calls must be a non-empty list"
    for number, call in enumerate(calls):
        at = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            return f"{at}.function must be an object with name and arguments"
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            return f"{at}.function.name must be a non-empty string"
        if tool_names is not None and name not in tool_names:
            return f"{at}.function.name {name!r} is not one of the tools ({', '.join(sorted(tool_names))})"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                return f"{at}.function.arguments is not valid JSON: {error}"
        if not isinstance(arguments, Mapping):
            return f"{at}.function.arguments must be a JSON object"
    return None


def _check_tools(tools: Any) -> str | None:
    if not isinstance(tools, list):
        return "tools must be a list"
    for number, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            return f"tools[{number}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}"
        if not isinstance(function.get("parameters", {}), Mapping):
            return f"tools[{number}].function.parameters must be a JSON schema object"
    return None


def _check_order(index: int, role: str, previous: dict[str, Any] | None) -> str | None:
    """Whether a message with `role` may follow `previous` (None at the start)."""
    before = previous["role"] if previous else None
    allowed = {
        "system": before is None,
        "user": before in (None, "system", "assistant"),
        "assistant": before in ("user", "tool"),
        "tool": before == "tool" or (before == "assistant" and bool(previous.get("tool_calls"))),
    }
    if not allowed[role]:
        after = f"after a {before} message" if before else "first"
        return f"messages[{index}]: role {role!r} cannot come {after}"
    return None


def conversation_error(conversation: Conversation, render: bool = True) -> str | None:
    """What is wrong with a conversation (naming the field), or None when it is valid and renders;
    `render=False` skips the rendering, for a caller that renders it next anyway (SFT tokenisation)."""
    messages, tools = conversation.messages, conversation.tools
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    if tools is not None:
        problem = _check_tools(tools)
        if problem:
            return problem
    tool_names = {t["function"]["name"] for t in tools} if tools else None
    previous = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            return f"{where} is not an object"
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            return f"{where} has unknown key {unknown[0]!r} (known: {', '.join(sorted(MESSAGE_KEYS))})"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{where}.role is {role!r}, not one of {', '.join(ROLES)}"
        problem = _check_order(index, role, previous)
        if problem:
            return problem
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                return f"{where}.tool_calls is only allowed on assistant messages"
            problem = _check_tool_calls(where, calls, tool_names)
            if problem:
                return problem
        if content is not None and not isinstance(content, str):
            return f"{where}.content is {type(content).__name__}, not a string"
        if not (content or "").strip() and calls is None:
            return f"{where}.content is empty"
        previous = message
    if previous["role"] != "assistant":
        return f"messages[{len(messages) - 1}]: the last message is {previous['role']}, not assistant"
    if not render:
        return None
    try:
        render_chat(messages, tools=tools)
    except FidelError as error:
        return f"does not render with the chat template: {error}"
    return None


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def dedup_key(conversation: Conversation) -> str:
    """Normalized text of the whole conversation (NFC, whitespace collapsed, case folded; roles, tool calls
    and tools included), for exact deduplication."""
    parts = [json.dumps(conversation.tools, sort_keys=True, ensure_ascii=False)] if conversation.tools else []
    for message in conversation.messages:
        parts.append(f"<{message['role']}>{_normal(message.get('content') or '')}")
        for call in message.get("tool_calls") or []:
            function = call["function"]
            arguments = function["arguments"]
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            parts.append(f"<call>{function['name']}{json.dumps(arguments, sort_keys=True)}")
    return "\n".join(parts)


def message_texts(conversation: Conversation) -> list[str]:
    """Every text a conversation shows (message contents and tool-call arguments), for decontamination."""
    texts = [m.get("content") or "" for m in conversation.messages]
    texts += [c["function"]["arguments"] for m in conversation.messages for c in m.get("tool_calls") or []]
    return [t if isinstance(t, str) else json.dumps(t, ensure_ascii=False) for t in texts if t]
