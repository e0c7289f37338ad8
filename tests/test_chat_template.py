"""The chat template: exact ChatML text, Hermes tool calls and results, and what servers parse back."""

from __future__ import annotations

import copy
import json
import re

import pytest

from fidellm.chat import CHAT_TEMPLATE, render_chat
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
from fixtures.chats import ARGUMENTS, CHATS, WEATHER_TOOL, tool_chat

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
"""vLLM's hermes parser's pattern for a finished call (its content is then json.loads-ed)."""


def turn(role: str, text: str) -> str:
    return f"{IM_START}{role}\n{text}{IM_END}\n"


def test_plain_turns_are_chatml_after_one_bos() -> None:
    messages, _ = CHATS["plain"]
    text = render_chat(messages)
    assert text == BOS + "".join(turn(m["role"], m["content"]) for m in messages)
    assert text.count(BOS) == 1
    assert render_chat(messages, add_generation_prompt=True) == text + f"{IM_START}assistant\n"


def test_content_parts_join_with_newlines_and_developer_renders_as_system() -> None:
    messages, _ = CHATS["content_parts"]
    assert render_chat(messages) == BOS + turn("system", "አጭር መልስ ስጥ።") + turn("user", "ሰላም\n2 + 2 ስንት ነው?")
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(FidelError, match="only text content parts are supported, got type image_url"):
        render_chat([image])


def test_tools_merge_into_the_system_turn() -> None:
    system = "አንተ አጋዥ ረዳት ነህ።"
    with_system = render_chat(
        [{"role": "system", "content": system}, {"role": "user", "content": "ሰላም"}], [WEATHER_TOOL]
    )
    without_system = render_chat([{"role": "user", "content": "ሰላም"}], [WEATHER_TOOL])
    header = f"{BOS}{IM_START}system\n"
    assert with_system.startswith(header + system + "\n\n# Tools\n")
    assert without_system.startswith(header + "# Tools\n")
    # One system turn either way, with the schemas unescaped, one per line, between <tools> and </tools>.
    for text in (with_system, without_system):
        assert text.count(f"{IM_START}system") == 1
        assert text.endswith(turn("user", "ሰላም"))
        assert f"<tools>\n{json.dumps(WEATHER_TOOL, ensure_ascii=False)}\n</tools>" in text
        assert "የአየር ሁኔታ" in text and "\\u" not in text
        assert (
            f'{TOOL_CALL_START}{{"name": <function-name>, "arguments": <arguments-object>}}{TOOL_CALL_END}'
            in text
        )
    assert with_system.replace(system + "\n\n", "") == without_system
    assert render_chat([{"role": "user", "content": "ሰላም"}], tools=[]) == BOS + turn("user", "ሰላም")


def test_tool_calls_and_results() -> None:
    messages, tools = CHATS["tools_and_results"]
    text = render_chat(messages, tools)
    first = json.dumps({"name": "get_weather", "arguments": ARGUMENTS}, ensure_ascii=False)
    second = json.dumps({"name": "get_weather", "arguments": {"city": "ጎንደር"}}, ensure_ascii=False)
    calls = f"{TOOL_CALL_START}{first}{TOOL_CALL_END}\n{TOOL_CALL_START}{second}{TOOL_CALL_END}"
    results = "\n".join(
        f"{TOOL_RESPONSE_START}{message['content']}{TOOL_RESPONSE_END}" for message in messages[3:5]
    )
    assert text.endswith(
        turn("user", messages[1]["content"])
        + turn("assistant", calls)
        + turn("tool", results)
        + turn("assistant", messages[-1]["content"])
    )
    assert "\\u" not in text
    # What vLLM's hermes parser (and llama.cpp's Hermes 2 Pro handler) read back from the assistant turn.
    assistant = text.split(f"{IM_START}assistant\n")[1]
    parsed = [json.loads(match) for match in TOOL_CALL_RE.findall(assistant)]
    assert parsed == [
        {"name": "get_weather", "arguments": ARGUMENTS},
        {"name": "get_weather", "arguments": {"city": "ጎንደር"}},
    ]
    # Content before the calls stays, on its own line; HF's flat {name, arguments} calls work too.
    flat = {
        "role": "assistant",
        "content": "እፈልጋለሁ።",
        "tool_calls": [{"name": "get_weather", "arguments": ARGUMENTS}],
    }
    assert render_chat([flat]) == BOS + turn("assistant", f"እፈልጋለሁ።\n{TOOL_CALL_START}{first}{TOOL_CALL_END}")


@pytest.mark.parametrize(
    "arguments",
    [
        json.dumps(ARGUMENTS),  # the OpenAI client's spelling: ASCII-escaped
        json.dumps(ARGUMENTS, ensure_ascii=False, separators=(",", ":")),
        json.dumps(ARGUMENTS, ensure_ascii=False),
    ],
)
def test_tool_call_arguments_as_json_string_render_like_a_dict(arguments: str) -> None:
    messages, tools = CHATS["tools_and_results"]
    assert render_chat(tool_chat(arguments), tools) == render_chat(messages, tools)


def test_render_chat_leaves_its_input_alone() -> None:
    messages = tool_chat(json.dumps(ARGUMENTS))
    before = copy.deepcopy(messages)
    render_chat(messages, [WEATHER_TOOL])
    assert messages == before


def test_template_is_built_from_the_reserved_tokens() -> None:
    assert CHAT_TEMPLATE.startswith("{{- bos_token }}")
    for token in (IM_START, IM_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END):
        assert token in CHAT_TEMPLATE
    assert "@" not in CHAT_TEMPLATE  # every placeholder was filled


def test_bad_chats_are_clear_errors() -> None:
    with pytest.raises(FidelError, match="at least one message"):
        render_chat([])
    with pytest.raises(FidelError, match="unknown chat role narrator"):
        render_chat([{"role": "narrator", "content": "x"}])
    with pytest.raises(FidelError, match=r"messages\[1\] must be an object with a 'role'"):
        render_chat([{"role": "user", "content": "x"}, {"content": "y"}])
    with pytest.raises(
        FidelError, match=r"messages\[2\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"
    ):
        render_chat(tool_chat('{"city": '))
    with pytest.raises(
        FidelError, match=r"messages\[0\]\.tool_calls\[0\] needs a function name and arguments"
    ):
        render_chat([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}])


def test_tools_nested_deeper_than_the_stack_are_a_fidel_error() -> None:
    """JSON a parser accepts (~1,000 levels) can be too deep to copy and write back: a clear error, not
    a RecursionError (a 500 from the server)."""
    parameters: dict = {}
    for _ in range(5000):
        parameters = {"type": "object", "properties": {"x": parameters}}
    tool = {"type": "function", "function": {"name": "deep", "parameters": parameters}}
    with pytest.raises(FidelError, match="nested too deeply"):
        render_chat([{"role": "user", "content": "ሰላም"}], tools=[tool])
