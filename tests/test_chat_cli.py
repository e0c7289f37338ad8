"""`fidellm chat`: the session's memory (context trimming, save/load, tool calls) with scripted and tiny
random models, and the command itself driven through a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pexpect
import pytest
import torch
from rich.console import Console
from torch import Tensor, nn

from fidellm.chat.cli import chat_loop
from fidellm.chat.session import SAVE_FORMAT, ChatSession
from fidellm.errors import FidelError
from fidellm.export.hf import export_hf
from fidellm.generate.engine import GenerationConfig, generate
from fidellm.models.load import load_model
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.base import TextTokenizer
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fidellm.tokenizer.special import BOS, IM_END, IM_END_ID, IM_START, TOOL_CALL_START, TOOL_RESPONSE_START
from fixtures.chats import ARGUMENTS, WEATHER_TOOL
from fixtures.models import gqa_config, random_llama

VOCAB = 768
GREEDY = GenerationConfig(max_new_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE trained on the real FLORES-200 Amharic dev set, with the reserved tokens."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe(flores("dev"), VOCAB, show_progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> BPETokenizer:
    return BPETokenizer.load(tokenizer_dir)


def flores(split: str) -> list[str]:
    return (resolve_data_dir() / "flores200" / f"amh_Ethi.{split}").read_text(encoding="utf-8").splitlines()


class ScriptedModel(nn.Module):
    """A stand-in model whose greedy choice is the next id of `script`, one per forward call (prefill
    and every step), so a test decides exactly what the "model" says. Records every prompt it gets."""

    def __init__(self, script: list[int], context: int = 512):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=context, eos_token_id=None)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the decoder a device
        self.script = list(script)
        self.prompts: list[list[int]] = []

    def new_cache(self) -> None:
        return None

    def forward(
        self, ids: Tensor, cache: None = None, attention_mask: Tensor | None = None, logits_to_keep: int = 0
    ) -> Any:
        if ids.shape[1] > 1:  # prefill: the whole prompt
            self.prompts.append(ids[0].tolist())
        logits = torch.zeros(ids.shape[0], logits_to_keep or ids.shape[1], VOCAB)
        logits[:, -1, self.script.pop(0)] = 1.0
        return SimpleNamespace(logits=logits)


def turn(tokenizer: TextTokenizer, text: str) -> list[int]:
    """The ids of one scripted assistant turn: `text`, then `<|im_end|>`."""
    return [*tokenizer.encode(text), IM_END_ID]


def test_trimming_drops_oldest_turns_and_keeps_system(tokenizer: BPETokenizer) -> None:
    questions = [line for line in flores("devtest") if 15 <= len(tokenizer.encode(line)) <= 40][:6]
    answers = ["ሰላም ነው።", "አዎ።", "እሺ።", "አመሰግናለሁ።", "ደህና ሁን።", "ጥሩ።"]
    model = ScriptedModel([i for answer in answers for i in turn(tokenizer, answer)], context=160)
    system = "አንተ አጋዥ ረዳት ነህ።"
    session = ChatSession(model, tokenizer, GREEDY, system=system)
    dropped = []
    for question, answer in zip(questions, answers, strict=True):
        session.add_user(question)
        reply = session.respond()
        assert reply.content == answer and reply.finish_reason == "stop"
        dropped.append(reply.dropped)
        prompt = model.prompts[-1]
        assert len(prompt) + GREEDY.max_new_tokens <= 160
        text = tokenizer.decode(prompt)
        assert text.startswith(f"{BOS}{IM_START}system\n{system}")
        assert question in text
    assert sum(dropped) > 0 and dropped[0] == 0
    first_kept = session.messages[0]["content"]
    assert session.messages[0]["role"] == "user" and first_kept != questions[0]
    assert questions[0] not in tokenizer.decode(model.prompts[-1])  # the oldest turn is gone
    assert len(session.messages) == 2 * (len(questions) - sum(dropped))


def test_message_too_long_for_context_is_a_clear_error(tokenizer: BPETokenizer) -> None:
    session = ChatSession(ScriptedModel([], context=64), tokenizer, GREEDY, system="ስርዓት")
    session.add_user(" ".join(flores("devtest")[:5]))
    with pytest.raises(FidelError, match="context of 64 tokens"):
        session.respond()


def test_reply_streams_the_text_generate_gives(tokenizer_dir: Path, tokenizer: BPETokenizer) -> None:
    model = random_llama(gqa_config(vocab_size=VOCAB, max_position_embeddings=128))
    config = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3)
    session = ChatSession(model, tokenizer, config, system="ስርዓት")
    session.add_user("ሰላም እንዴት ነህ?")
    chunks: list[str] = []
    reply = session.respond(chunks.append)
    turns = f"{IM_START}system\nስርዓት{IM_END}\n{IM_START}user\nሰላም እንዴት ነህ?{IM_END}\n{IM_START}assistant\n"
    prompt = tokenizer.encode(BOS + turns)
    expected = generate(model, tokenizer, [prompt], session.config)[0]
    assert "".join(chunks) == expected.text == reply.content
    assert len(chunks) > 1  # streamed, not given at once
    assert session.messages[-1] == {"role": "assistant", "content": expected.text}


def test_tool_call_is_parsed_answered_and_continued(tokenizer: BPETokenizer) -> None:
    call = json.dumps({"name": "get_weather", "arguments": ARGUMENTS}, ensure_ascii=False)
    script = turn(tokenizer, f"{TOOL_CALL_START}{call}</tool_call>") + turn(tokenizer, "ፀሐያማ ነው።")
    model = ScriptedModel(script, context=2048)  # the tool instructions alone take ~600 of these tokens
    config = GenerationConfig(max_new_tokens=200, temperature=0)
    session = ChatSession(model, tokenizer, config, tools=[WEATHER_TOOL])
    session.add_user("የአዲስ አበባ የአየር ሁኔታ?")
    shown: list[str] = []
    reply = session.respond(shown.append)
    assert reply.content is None and "".join(shown) == ""  # the call is not streamed as text
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [("get_weather", ARGUMENTS)]
    with pytest.raises(FidelError, match="nothing to reply to"):
        session.respond()
    session.add_tool_result(reply.calls[0], "25°C ፀሐያማ")
    final = session.respond(shown.append)
    assert final.content == "ፀሐያማ ነው።" == "".join(shown) and final.calls == []
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    second_prompt = tokenizer.decode(model.prompts[1])
    assert f"{TOOL_CALL_START}{call}</tool_call>" in second_prompt
    assert f"{IM_START}tool\n{TOOL_RESPONSE_START}25°C ፀሐያማ</tool_response>" in second_prompt
    assert '"name": "get_weather"' in tokenizer.decode(model.prompts[0])  # the tools are in the prompt


def saved_chat(tokenizer: BPETokenizer, path: Path) -> ChatSession:
    model = ScriptedModel([], context=2048)
    session = ChatSession(model, tokenizer, GREEDY, system="ስርዓት", tools=[WEATHER_TOOL])
    session.add_user("ሰላም")
    session.messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        }
    )
    session.messages.append({"role": "tool", "tool_call_id": "c1", "content": "ዝናብ"})
    session.save(path)
    return session


def test_save_load_round_trip(tokenizer: BPETokenizer, tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    original = saved_chat(tokenizer, path)
    assert "ሰላም" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    loaded = ChatSession(ScriptedModel([], context=2048), tokenizer, GREEDY)
    loaded.load(path)
    assert (loaded.system, loaded.tools, loaded.messages) == (
        original.system,
        original.tools,
        original.messages,
    )
    assert loaded.fit() == original.fit()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read the chat file"),
        ('{"format": "other"}', "not a saved chat"),
        (json.dumps({"format": SAVE_FORMAT, "version": 9}), "unsupported chat file version"),
        (json.dumps({"format": SAVE_FORMAT, "version": 1, "messages": {}}), "messages must be a list"),
        (
            json.dumps({"format": SAVE_FORMAT, "version": 1, "messages": [{"role": "robot"}]}),
            r"messages\[0\] must be an object with a role",
        ),
        (
            json.dumps({"format": SAVE_FORMAT, "version": 1, "messages": [{"role": "user", "content": 5}]}),
            r"messages\[0\].content must be a string",
        ),
        (json.dumps({"format": SAVE_FORMAT, "version": 1, "tools": [{}], "messages": []}), r"tools\[0\]"),
        (
            json.dumps(
                {
                    "format": SAVE_FORMAT,
                    "version": 1,
                    "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}],
                }
            ),
            "needs a function name and arguments",
        ),
    ],
)
def test_bad_chat_files_are_refused_and_change_nothing(
    tokenizer: BPETokenizer, tmp_path: Path, content: str, message: str
) -> None:
    session = saved_chat(tokenizer, tmp_path / "good.json")
    before = (session.system, session.tools, [dict(m) for m in session.messages])
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(FidelError, match=message) as error:
        session.load(bad)
    assert str(bad) in str(error.value)
    assert (session.system, session.tools, session.messages) == before
    with pytest.raises(FidelError, match="cannot read the chat file"):
        session.load(tmp_path / "missing.json")


def plain(text: str) -> str:
    """Terminal output without whitespace and control characters (line ends, rich's tab expansion)."""
    return re.sub(r"[\s\x00-\x1f\x7f]", "", text)


def spawn_chat(model_dir: Path, tmp_path: Path, *options: str) -> pexpect.spawn:
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    args = ["-m", "fidellm", "chat", str(model_dir), "--device", "cpu", "--temperature", "0", *options]
    child = pexpect.spawn(
        sys.executable, args, cwd=str(tmp_path), env=env, encoding="utf-8", timeout=30, dimensions=(40, 200)
    )
    child.expect_exact("you> ", timeout=90)  # loading torch and the model, slower on a busy machine
    return child


def test_chat_in_a_pseudo_terminal(tokenizer_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    config = gqa_config(vocab_size=VOCAB, max_position_embeddings=128, num_hidden_layers=2)
    export_hf(random_llama(config), config, tokenizer_dir, model_dir, dtype="float32")
    model, _ = load_model(model_dir)
    expected = ChatSession(model, BPETokenizer.load(tokenizer_dir), GREEDY, system="ስርዓት")
    question = "ሰላም፣ እንዴት ነህ?"
    expected.add_user(question)
    reply = expected.respond()
    answer = reply.content or ""
    note = "(cut at --max-new-tokens 16)" if reply.finish_reason == "length" else ""

    child = spawn_chat(model_dir, tmp_path, "--max-new-tokens", "16", "--system", "ስርዓት")
    child.sendline(question)
    child.expect_exact("model> ")
    child.expect_exact("you> ")
    assert plain(child.before) == plain(answer + note) and plain(answer)  # the reply, then the prompt again
    for line, answer_shown in [
        ("/system አንተ ረዳት ነህ።", "(system prompt set)"),
        ("/system", "system: አንተ ረዳት ነህ።"),
        ("/load nowhere.json", "error: nowhere.json: cannot read the chat file"),
        ("/save saved.json", "(saved 2 messages to saved.json)"),
    ]:
        child.sendline(line)
        child.expect_exact(answer_shown)
        child.expect_exact("you> ")  # waiting for readline to take the terminal again: no typing ahead
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")
    saved = json.loads((tmp_path / "saved.json").read_text(encoding="utf-8"))
    assert saved["system"] == "አንተ ረዳት ነህ።"
    assert saved["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]

    child = spawn_chat(model_dir, tmp_path, "--max-new-tokens", "16")  # the default 256 exceeds 128
    child.sendline("/load saved.json")
    child.expect_exact("(loaded 2 messages from saved.json)")
    child.expect_exact("you> ")  # a Ctrl-D typed ahead, before readline has the terminal, is lost
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


def test_chat_loop_shows_tool_calls_and_asks_for_results(
    tokenizer: BPETokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    call = json.dumps({"name": "get_weather", "arguments": ARGUMENTS}, ensure_ascii=False)
    script = turn(tokenizer, f"ልፈልግ።{TOOL_CALL_START}{call}</tool_call>") + turn(tokenizer, "ፀሐያማ ነው።")
    session = ChatSession(
        ScriptedModel(script, context=2048),
        tokenizer,
        GenerationConfig(max_new_tokens=200, temperature=0),
        tools=[WEATHER_TOOL],
    )
    lines = iter(["/help", "/bogus", "የአየር ሁኔታ?", "25°C", "/reset"])
    prompts: list[str] = []

    def typed(prompt: str = "") -> str:
        prompts.append(prompt)
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D once everything is typed
        return line

    monkeypatch.setattr("builtins.input", typed)
    output = io.StringIO()
    chat_loop(Console(file=output, width=200, no_color=True), session)
    text = output.getvalue()
    assert "/system TEXT" in text and "error: unknown command /bogus" in text
    assert f"tool call> get_weather({json.dumps(ARGUMENTS, ensure_ascii=False)})" in text
    assert "model> ልፈልግ።" in text and "model> ፀሐያማ ነው።" in text and TOOL_CALL_START not in text
    assert prompts == ["you> "] * 3 + ["result of get_weather> "] + ["you> "] * 2
    assert "(conversation cleared)" in text and session.messages == []


def test_ctrl_c_at_a_tool_result_prompt_forgets_the_exchange(
    tokenizer: BPETokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while asked for a tool's result abandons the exchange, as during a reply, instead of
    sending the model an empty result and generating on."""
    call = json.dumps({"name": "get_weather", "arguments": ARGUMENTS}, ensure_ascii=False)
    model = ScriptedModel(turn(tokenizer, f"{TOOL_CALL_START}{call}</tool_call>"), context=2048)
    config = GenerationConfig(max_new_tokens=200, temperature=0)
    session = ChatSession(model, tokenizer, config, tools=[WEATHER_TOOL])
    typed = iter(["የአየር ሁኔታ?", KeyboardInterrupt, EOFError])

    def next_line(prompt: str = "") -> str:
        line = next(typed)
        if isinstance(line, str):
            return line
        raise line

    monkeypatch.setattr("builtins.input", next_line)
    output = io.StringIO()
    chat_loop(Console(file=output, width=200, no_color=True), session)
    assert "(interrupted; this exchange is forgotten)" in output.getvalue()
    assert session.messages == [] and len(model.prompts) == 1  # no second reply was generated
