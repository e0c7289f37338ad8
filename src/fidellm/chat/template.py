"""The chat template: ChatML turns with Hermes-style tool calls, the project's single home for it.

One Jinja string, `CHAT_TEMPLATE`, is written into every exported tokenizer_config.json (and GGUF), and
`render_chat` renders it in Python exactly as transformers' `apply_chat_template` does, so SFT data,
the server and the chat CLI all see the text that transformers, vLLM and llama.cpp build.

Format (shared/design/ecosystem.md, "Chat and tool-call conventions"):
- The text starts with `<|bos|>`; each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
- Roles: system, developer (rendered as system), user, assistant, tool. Content is a string or a list
  of OpenAI content parts; text parts are joined with "\\n" (as vLLM and llama.cpp do), others refused.
- `tools` go into the first system turn, after the given system message, as JSON schemas one per line
  between `<tools>` and `</tools>`, with the instruction to answer with
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, what vLLM's `hermes` parser and
  llama.cpp's Hermes 2 Pro handler read).
- An assistant's `tool_calls` are rendered the same way, one per line after its content. Arguments
  may be a dict (transformers) or a JSON string (the OpenAI wire): a dict goes through `tojson`, a
  string is copied, so `json.dumps(args, ensure_ascii=False)` renders exactly like `args`.
  `render_chat` parses JSON strings first (as vLLM does), so any spelling of the same arguments
  renders identically there.
- Consecutive `tool` messages share one `<|im_start|>tool` turn (Hermes 2 Pro's convention), each
  wrapped as `<tool_response>...</tool_response>`, one per line, in the order of the calls.
- `add_generation_prompt` appends `<|im_start|>assistant\\n`.
The template uses only what transformers' sandbox, vLLM and llama.cpp's minja all provide (no macros,
no filters besides `tojson`), and whitespace control on every tag, so trim settings do not matter.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fidellm.errors import FidelError
from fidellm.tokenizer.special import (
    BOS,
    IM_END,
    IM_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
)

if TYPE_CHECKING:
    from fidellm.tokenizer.base import TextTokenizer

TOOLS_INTRO = (
    "# Tools\n\nYou can call functions to help with the request. Each function is described by a JSON"
    " schema, one per line, between <tools> and </tools>:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nTo call a function, answer with one line per call, each a JSON object with the"
    f' function\'s name and arguments:\n{TOOL_CALL_START}{{"name": <function-name>, "arguments":'
    f" <arguments-object>}}{TOOL_CALL_END}"
)


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are a subset of Jinja's and minja's)."""
    return json.dumps(text, ensure_ascii=False)


_TEMPLATE_SOURCE = r"""
{{- bos_token }}
{%- set ns = namespace(text='') %}
{%- for message in messages %}
    {#- The message's text: a string, or its text parts joined by newlines. #}
    {%- if message.content is not defined or message.content is none %}
        {%- set content = '' %}
    {%- elif message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set ns.text = '' %}
        {%- for part in message.content %}
            {%- if part.type != 'text' %}
                {{- raise_exception('only text content parts are supported, got type ' ~ part.type) }}
            {%- endif %}
            {%- set ns.text = ns.text ~ ('' if loop.first else '\n') ~ part.text %}
        {%- endfor %}
        {%- set content = ns.text %}
    {%- endif %}
    {%- set is_system = message.role in ['system', 'developer'] %}
    {#- The tools open the chat in a system turn, after the system message when there is one. #}
    {%- if loop.first and tools %}
        {{- '@IM_START@system\n' }}
        {%- if is_system and content %}
            {{- content ~ '\n\n' }}
        {%- endif %}
        {{- @TOOLS_INTRO@ }}
        {%- for tool in tools %}
            {{- '\n' ~ (tool | tojson) }}
        {%- endfor %}
        {{- @TOOLS_OUTRO@ ~ '@IM_END@\n' }}
    {%- endif %}
    {%- if is_system %}
        {%- if not (loop.first and tools) %}
            {{- '@IM_START@system\n' ~ content ~ '@IM_END@\n' }}
        {%- endif %}
    {%- elif message.role in ['user', 'assistant'] %}
        {{- '@IM_START@' ~ message.role ~ '\n' ~ content }}
        {%- if message.tool_calls is defined and message.tool_calls is not none %}
            {%- for call in message.tool_calls %}
                {%- set function = call.function if call.function is defined else call %}
                {%- if content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {%- if function.arguments is string %}
                    {%- set arguments = function.arguments %}
                {%- else %}
                    {%- set arguments = function.arguments | tojson %}
                {%- endif %}
                {{- '@TOOL_CALL_START@{"name": ' ~ (function.name | tojson) ~ ', "arguments": ' ~ arguments }}
                {{- '}@TOOL_CALL_END@' }}
            {%- endfor %}
        {%- endif %}
        {{- '@IM_END@\n' }}
    {%- elif message.role == 'tool' %}
        {#- Consecutive tool results share one turn, one per line. #}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '@IM_START@tool\n' }}
        {%- else %}
            {{- '\n' }}
        {%- endif %}
        {{- '@TOOL_RESPONSE_START@' ~ content ~ '@TOOL_RESPONSE_END@' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '@IM_END@\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown chat role ' ~ message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '@IM_START@assistant\n' }}
{%- endif %}
"""
"""The template with @NAME@ placeholders for the reserved-token strings and the tool instructions.
Every tag strips the whitespace before it, so the layout here never reaches the rendered text."""

_PLACEHOLDERS: dict[str, str] = {
    "@IM_START@": IM_START,
    "@IM_END@": IM_END,
    "@TOOL_CALL_START@": TOOL_CALL_START,
    "@TOOL_CALL_END@": TOOL_CALL_END,
    "@TOOL_RESPONSE_START@": TOOL_RESPONSE_START,
    "@TOOL_RESPONSE_END@": TOOL_RESPONSE_END,
    "@TOOLS_INTRO@": _literal(TOOLS_INTRO),
    "@TOOLS_OUTRO@": _literal(TOOLS_OUTRO),
}

CHAT_TEMPLATE = functools.reduce(
    lambda text, item: text.replace(*item), _PLACEHOLDERS.items(), _TEMPLATE_SOURCE
).strip()
"""The Jinja chat template written into tokenizer_config.json and GGUF `tokenizer.chat_template`."""


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson` filter: plain json.dumps, non-ASCII kept (Jinja's own escapes HTML)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.cache
def _compiled() -> jinja2.Template:
    """The template compiled in the sandbox transformers uses, with its settings, filter and globals."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    return environment.from_string(CHAT_TEMPLATE)


def _prepared(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` as the template should see them: None-valued keys dropped (as
    transformers does) and JSON-string tool-call arguments parsed into objects (as vLLM does)."""
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise FidelError(f"messages[{index}] must be an object with a 'role', got {message!r}")
        message = {key: copy.deepcopy(value) for key, value in message.items() if value is not None}
        for number, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function", call) if isinstance(call, Mapping) else None
            if function is None or "name" not in function or "arguments" not in function:
                raise FidelError(
                    f"messages[{index}].tool_calls[{number}] needs a function name and arguments"
                )
            if isinstance(function["arguments"], str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError as error:
                    where = f"messages[{index}].tool_calls[{number}].function.arguments"
                    raise FidelError(f"{where} is not valid JSON: {error}") from error
        prepared.append(message)
    return prepared


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The chat as text, `<|bos|>` first: what `tokenizer.apply_chat_template(messages, tools=tools,
    add_generation_prompt=..., tokenize=False)` returns for an exported model. Encode the result
    without adding another BOS. Malformed messages raise FidelError."""
    if not messages:
        raise FidelError("a chat needs at least one message")
    try:
        return _compiled().render(
            messages=_prepared(messages),
            tools=[copy.deepcopy(dict(tool)) for tool in tools] if tools else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=BOS,
        )
    except jinja2.TemplateError as error:
        raise FidelError(f"chat template: {error}") from error
    except RecursionError:  # copying or writing JSON nested deeper than Python's stack allows
        raise FidelError("chat template: messages or tools nested too deeply to render") from None


def encode_chat(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat (`render_chat`'s text, or a prefix of it). With our BPE every
    marker is one special id. A byte tokenizer (H-Net) has no ids for markers: the leading `<|bos|>`
    becomes its BOS byte (254, as at the start of every pretraining document) and the turn markers stay
    literal UTF-8 text, so the same conversation is one byte sequence in SFT, the chat CLI and the server."""
    if text.startswith(BOS) and tokenizer.encode(BOS) != [tokenizer.bos_id]:
        return [tokenizer.bos_id, *tokenizer.encode(text[len(BOS) :])]
    return tokenizer.encode(text, add_bos=False)


def end_of_turn_ids(tokenizer: TextTokenizer) -> list[int]:
    """The ids that close a turn: `<|im_end|>` as one id (BPE) or as its bytes (byte tokenizer)."""
    return tokenizer.encode(IM_END)
