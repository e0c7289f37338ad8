"""Log-probabilities of tokens that are parts of a UTF-8 character (every byte of an Ethiopic letter for
a byte model, byte-level BPE pieces): each token reports its own bytes, a token that is not UTF-8 on its
own is shown as `bytes:\\x..` so alternatives stay apart, and text offsets count characters of the text."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import torch

import serve_helpers
from fidellm.models.llama import LlamaForCausalLM
from fidellm.serve import engine
from fidellm.tokenizer.bytes import ByteTokenizer
from fidellm.tokenizer.special import BYTE_EOS_ID, IM_END_ID
from serve_helpers import ScriptedModel, app_for, run, tiny_llama

TEXT = "ሰላም ኢትዮጵያ"


def shown(raw: bytes) -> str:
    """A token as the server shows it: its text, or `bytes:\\x..` when not UTF-8 on its own."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


bpe_512 = serve_helpers.bpe_512
llama_512 = serve_helpers.llama_512


@pytest.fixture(scope="module")
def byte_model() -> LlamaForCausalLM:
    return tiny_llama(256, 128, seed=1)


def test_echoed_byte_tokens_keep_their_bytes_and_character_offsets(byte_model) -> None:
    """Each byte of ሰላም is its own token: shown as bytes:\\xe1 etc., the 5 alternatives stay 5 keys, and
    the three bytes of the i-th letter all have text_offset i (never past the text)."""
    app = app_for(byte_model, ByteTokenizer())
    request = {"model": "tiny", "prompt": "ሰላም", "max_tokens": 0, "echo": True, "logprobs": 5}
    reply = run(app, lambda _, raw: raw.post("/v1/completions", json=request)).json()
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == "ሰላም"
    assert logprobs["tokens"] == ["", *(shown(bytes((b,))) for b in "ሰላም".encode())]  # BOS shows as nothing
    assert logprobs["tokens"][1:4] == ["bytes:\\xe1", "bytes:\\x88", "bytes:\\xb0"]
    assert logprobs["text_offset"] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len(top) == 5 for top in logprobs["top_logprobs"][1:])

    generated = {**request, "max_tokens": 6, "echo": False, "temperature": 0}
    reply = run(app, lambda _, raw: raw.post("/v1/completions", json=generated)).json()
    logprobs = reply["choices"][0]["logprobs"]
    text = "ሰላም" + reply["choices"][0]["text"]  # offsets count from the prompt's start, as OpenAI's
    assert logprobs["text_offset"][0] == 3 and max(logprobs["text_offset"]) <= len(text)


@pytest.mark.parametrize("byte_level", [True, False])
def test_chat_logprobs_bytes_are_the_tokens_own(byte_model, bpe_512, llama_512, byte_level: bool) -> None:
    """The generated tokens' `bytes` join into the reply's UTF-8 (then the stop token), and every token
    and alternative is shown from its own bytes."""
    if byte_level:
        tokenizer: Any = ByteTokenizer()
        model = ScriptedModel(byte_model, [*TEXT.encode(), BYTE_EOS_ID])
    else:
        tokenizer = bpe_512
        model = ScriptedModel(llama_512, [*tokenizer.encode(TEXT), IM_END_ID])
    request = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "ሰላም"}],
        "max_tokens": 40,
        "logprobs": True,
        "top_logprobs": 4,
    }

    async def body(_: Any, raw: httpx2.AsyncClient) -> dict[str, Any]:
        return (await raw.post("/v1/chat/completions", json=request)).json()

    choice = run(app_for(model, tokenizer), body)["choices"][0]
    entries = choice["logprobs"]["content"]
    assert choice["message"]["content"] == TEXT
    assert b"".join(bytes(entry["bytes"]) for entry in entries[:-1]) == TEXT.encode()
    assert any(entry["token"].startswith("bytes:\\x") for entry in entries)  # parts of letters: ኢ, ጵ
    for entry in entries:
        for item in [entry, *entry["top_logprobs"]]:
            assert item["token"] == shown(bytes(item["bytes"]))
        assert len({alternative["token"] for alternative in entry["top_logprobs"]}) == 4


@pytest.mark.parametrize("positions", [2048, 24])
def test_scoring_many_prompts_in_batches_gives_each_prompts_own_log_probabilities(
    bpe_512, llama_512, monkeypatch: pytest.MonkeyPatch, positions: int
) -> None:
    """Prompts of different lengths scored together (echo, max_tokens 0: lm-eval's loglikelihood) get the
    log-probabilities of their own forward pass, also when a pass holds a few rows (24 positions) or a
    row longer than that alone; and generated tokens scored beside long prompts as well."""
    monkeypatch.setattr(engine, "SCORE_POSITIONS", positions)
    app = app_for(llama_512, bpe_512)
    texts = ["ሰላም", "ኢትዮጵያ ውብ አገር ናት።", "ቡና", "አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት፤ ብዙ ሰዎች ይኖሩባታል።"]
    prompts = [bpe_512.encode(text, add_bos=True) for text in texts]
    request = {"model": "tiny", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 2}
    reply = run(app, lambda _, raw: raw.post("/v1/completions", json=request)).json()
    assert max(map(len, prompts)) > 24 and len({len(p) for p in prompts}) == len(prompts)
    for ids, choice in zip(prompts, reply["choices"], strict=True):
        logprobs = choice["logprobs"]
        with torch.no_grad():
            alone = torch.log_softmax(llama_512(torch.tensor([ids])).logits[0, :-1].float(), -1)
        assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == len(ids)
        expected = alone.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
        best = [max(top.values()) for top in logprobs["top_logprobs"][1:]]
        assert best == pytest.approx(alone.max(-1).values.tolist(), abs=1e-5)
    generated = {**request, "max_tokens": 3, "temperature": 0}  # prompt and generated tokens, echoed
    echoed = run(app, lambda _, raw: raw.post("/v1/completions", json=generated)).json()["choices"]
    alone = run(app, lambda _, raw: raw.post("/v1/completions", json={**generated, "echo": False}))
    for full, own in zip(echoed, alone.json()["choices"], strict=True):  # only the generated ones scored
        own_values, full_values = own["logprobs"]["token_logprobs"], full["logprobs"]["token_logprobs"]
        assert len(own_values) == 3 and own_values == pytest.approx(full_values[-3:], abs=1e-5)
