"""Request validation of the server: JSON types are strict as in OpenAI's API (a 400, never a quiet
conversion), and a refused request names the parameter as OpenAI does."""

from __future__ import annotations

from typing import Any

import httpx2

import serve_helpers
from fidellm.models.llama import LlamaForCausalLM
from fidellm.serve.app import lone_surrogate
from fidellm.serve.cache import InProcessLRU
from fidellm.tokenizer.bpe import BPETokenizer
from serve_helpers import app_for, error_of, run

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "ሰላም"}]


tokenizer = serve_helpers.bpe_512
model = serve_helpers.llama_512


def post_all(model: LlamaForCausalLM, tokenizer: BPETokenizer, requests: list[tuple[str, dict[str, Any]]]):
    """The responses to `requests` (path, fields added to a valid body with max_tokens 2), in order."""
    bodies = {CHAT: {"model": "tiny", "messages": HELLO}, COMPLETIONS: {"model": "tiny", "prompt": "ሰላም"}}

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[httpx2.Response]:
        sent = [{**bodies[path], "max_tokens": 2, **fields} for path, fields in requests]
        return [await raw.post(path, json=fields) for (path, _), fields in zip(requests, sent, strict=True)]

    return run(app_for(model, tokenizer), body)


WRONG_TYPES = [
    (CHAT, {"max_tokens": "5"}, "max_tokens"),
    (CHAT, {"max_tokens": 5.0}, "max_tokens"),
    (CHAT, {"stream": "yes"}, "stream"),
    (CHAT, {"n": "2"}, "n"),
    (CHAT, {"temperature": "0.5"}, "temperature"),
    (CHAT, {"seed": "7"}, "seed"),
    (CHAT, {"logprobs": 1}, "logprobs"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    (COMPLETIONS, {"echo": "true"}, "echo"),
    (COMPLETIONS, {"logprobs": "1"}, "logprobs"),
]


def test_wrong_json_types_are_a_400_not_converted(model, tokenizer) -> None:
    """OpenAI refuses "5" for max_tokens and "yes" for stream; so does this server (pydantic's lax mode
    converted both and answered 200), naming the field."""
    responses = post_all(model, tokenizer, [(path, fields) for path, fields, _ in WRONG_TYPES])
    for (_, fields, param), response in zip(WRONG_TYPES, responses, strict=True):
        assert response.status_code == 400, (fields, response.text)
        error = error_of(response)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (fields, error)
    (floats,) = post_all(model, tokenizer, [(COMPLETIONS, {"prompt": [5.0, 6.0]})])
    assert floats.status_code == 400, floats.text


def test_what_clients_send_is_accepted(model, tokenizer) -> None:
    """Integers where numbers are expected (lm-eval sends temperature 0) and the payloads of lm-eval's
    local-completions backend (token-id prompts, echo, logprobs, seed) stay accepted, and so do nulls
    for nullable fields with defaults (`"n": null` was a 400: "Input should be a valid integer")."""
    accepted = [
        (CHAT, {"temperature": 1, "top_p": 1, "seed": 3, "n": 2, "stream": False}),
        (CHAT, {"temperature": 0.5, "logprobs": True, "top_logprobs": 2}),
        (COMPLETIONS, {"prompt": [[5, 6]], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}),
        (COMPLETIONS, {"prompt": ["ሰላም"], "temperature": 0, "stop": ["\n"], "seed": 1234}),
        # lm-eval's generate_until payload: a task's `until` plus the EOS text, not cut to OpenAI's 4
        (
            COMPLETIONS,
            {"prompt": ["ሰላም"], "temperature": 0, "stop": ["Q:", "</s>", "<|im_end|>", "\n\n", "።"]},
        ),
        # nulls OpenAI's spec allows, as clients passing None send them: the default
        (CHAT, {"n": None, "stream": None, "logprobs": None, "parallel_tool_calls": None, "top_p": None}),
        (CHAT, {"stream": True, "stream_options": {"include_usage": None}}),
        (COMPLETIONS, {"n": None, "stream": None, "echo": None, "logprobs": None}),
    ]
    for (_, fields), response in zip(accepted, post_all(model, tokenizer, accepted), strict=True):
        assert response.status_code == 200, (fields, response.text)


PARAMS = [
    (CHAT, {"messages": [{"role": "user", "content": "ሰላም " * 200}]}, "messages", "maximum context length"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "messages[0].role: "),
    (CHAT, {"stop": ""}, "stop", "stop: String should have at least 1 character"),
    (CHAT, {"stop": ["።", ""]}, "stop", "stop[1]: String should have at least 1 character"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
        "messages[0].content[0].type: Input should be 'text' (got \"image_url\")",
    ),
    (
        CHAT,
        {"tools": [], "tool_choice": {"type": "function", "function": {}}},
        "tool_choice",
        "tool_choice.function.name: Field required",
    ),
    (CHAT, {"top_logprobs": 3}, "top_logprobs", "top_logprobs needs logprobs set to true"),
    (COMPLETIONS, {"stop": [str(i) for i in range(17)]}, "stop", "stop: List should have at most 16 items"),
    (CHAT, {"logprobs": False, "top_logprobs": 0}, "top_logprobs", "needs logprobs"),
    (COMPLETIONS, {"prompt": [0, -1]}, "prompt", "prompt[1]: Input should be greater than or equal to 0"),
    (COMPLETIONS, {"prompt": [[5], [6, -2]]}, "prompt", "prompt[1][1]: Input should be greater than or"),
    (COMPLETIONS, {"prompt": ["ሰላም", 3]}, "prompt", "prompt[1]: Input should be a valid string (got 3)"),
    (COMPLETIONS, {"prompt": []}, "prompt", "prompt: List should have at least 1 item"),
]


def test_errors_name_the_parameter_as_openai_does(model, tokenizer) -> None:
    """Params are the API's names (`messages[0].role`, never pydantic's union tags such as
    `stop.constrained-str`); for a union the message is the error of the member the input fits (the
    negative id of a token-id list, not "should be a valid string"), located down to the bad value. A
    chat prompt over the context is an error of `messages` (chat requests have no `prompt`). As in vLLM,
    top_logprobs without logprobs is refused (it was ignored: no log-probabilities, no error)."""
    responses = post_all(model, tokenizer, [(path, fields) for path, fields, _, _ in PARAMS])
    for (_, fields, param, message), response in zip(PARAMS, responses, strict=True):
        error = error_of(response)
        assert response.status_code == 400 and error["param"] == param, (fields, error)
        assert message in error["message"], (fields, error)


LONE_SURROGATES = [
    (CHAT, '"messages": [{"role": "user", "content": "\\ud800"}]', "messages[0].content"),
    (CHAT, '"messages": [{"role": "user", "content": "x"}], "stop": ["a", "\\udfff"]', "stop"),
    (
        CHAT,
        '"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function":'
        ' {"name": "f", "parameters": {"properties": {"\\ud800": {}}}}}]',
        "tools[0].function.parameters.properties",
    ),
    (COMPLETIONS, '"prompt": "a\\udfff"', "prompt"),
    (COMPLETIONS, '"prompt": ["ok", "\\ud800"], "echo": true', "prompt[1]"),
    (COMPLETIONS, '"prompt": "a", "model": "\\ud800"', "model"),
]


def test_a_lone_surrogate_is_a_400_not_a_500(model, tokenizer) -> None:
    """JSON may escape half of a UTF-16 pair (`"\\ud800"`); that is no character, and the tokenizer,
    the cache key and the JSON reply all failed on it (500s and dropped connections). It is a 400 naming
    the field, with the response cache on too; an error message showing such a value escapes it."""
    app = app_for(model, tokenizer, cache=InProcessLRU(8), max_tokens_cap=8)
    heads = {CHAT: '"model": "tiny"', COMPLETIONS: '"model": "tiny"'}

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[httpx2.Response]:
        sent = [
            (path, f'{{{heads[path]}, "max_tokens": 2, "temperature": 0, {rest}}}')
            for path, rest, _ in LONE_SURROGATES
        ]
        sent.append((COMPLETIONS, '{"model": "tiny", "prompt": "a", "n": "\\ud800"}'))
        sent.append((COMPLETIONS, '{"model": "tiny", "prompt": "😀 \\ud83d\\ude00", "max_tokens": 1}'))
        headers = {"content-type": "application/json"}
        return [await raw.post(path, content=text.encode(), headers=headers) for path, text in sent]

    *refused, wrong_type, pair = run(app, body)
    for (_, _, param), response in zip(LONE_SURROGATES, refused, strict=True):
        assert response.status_code == 400 and error_of(response)["param"] == param, (param, response.text)
    assert wrong_type.status_code == 400 and '(got "\\ud800")' in error_of(wrong_type)["message"]
    assert pair.status_code == 200, pair.text  # an escaped pair is one character (U+1F600)


def test_the_surrogate_check_reads_any_body_and_any_depth(model, tokenizer) -> None:
    """Surrogates reach Python as JSON escapes, as raw UTF-8 bytes (json.loads decodes those with
    `surrogatepass`) or inside a UTF-16 body: all are 400s. The walk keeps its own stack: a tool's
    `parameters` nested a few hundred levels deep raised RecursionError in it (a 500)."""
    deep: Any = "\ud800"
    for _ in range(3000):
        deep = {"a": [deep]}
    assert lone_surrogate({"tools": [deep]}) == "tools[0]" + ".a[0]" * 3000
    head = '{"model": "tiny", "max_tokens": 2, "prompt": '
    bodies = [
        (head + '"a\\udfff"}').encode(),
        head.encode() + b'"a\xed\xa0\x80"}',  # U+D800 encoded as if it were a character
        (head + '"\\ud800"}').encode("utf-16"),
    ]

    async def body(_: Any, raw: httpx2.AsyncClient) -> list[httpx2.Response]:
        headers = {"content-type": "application/json"}
        return [await raw.post(COMPLETIONS, content=sent, headers=headers) for sent in bodies]

    for response in run(app_for(model, tokenizer), body):
        assert response.status_code == 400 and error_of(response)["param"] == "prompt", response.text
