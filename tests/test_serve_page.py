"""The chat page at `/` of `fidellm serve`, driven end to end in headless Chromium (Debian's chromium and
chromium-driver) against the real app on loopback: a tiny random Llama whose decoding is forced to a
known Amharic script, and a BPE trained on FLORES-200 Amharic dev."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

import serve_helpers
from fidellm.models.llama import LlamaForCausalLM, LMOutput
from fidellm.tokenizer.bpe import BPETokenizer
from fidellm.tokenizer.special import IM_END_ID
from fixtures.chats import WEATHER_TOOL
from fixtures.models import WrappedLM
from fixtures.server import loopback
from serve_helpers import NAME, app_for, tiny_llama

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "the chat page test needs Debian's chromium and chromium-driver (apt-get install chromium"
        " chromium-driver)",
        allow_module_level=True,
    )

KEY = "secret"
CAP = 200
SYSTEM = "አንተ አጋዥ ረዳት ነህ።"
ANSWER = "ሰላም! ደህና ነኝ፣ እግዚአብሔር ይመስገን። አንተስ እንዴት ነህ?"
SECOND = "ኢትዮጵያ <b>ውብ</b> አገር ናት።"  # markup from the model must stay text
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "አዲስ አበባ", "days": 2}}</tool_call>'


class ScriptedModel(WrappedLM):
    """Wraps a model so that decoding emits `script` token by token, whatever the weights say. A
    multi-token input with a cache (the prefill of a new request) restarts the script, so requests must
    not overlap (the page sends one at a time). `fail` makes every call raise; `delay` slows each step."""

    def __init__(self, inner: LlamaForCausalLM):
        super().__init__(inner)
        self.script, self.step, self.fail, self.delay = [IM_END_ID], 0, False, 0.0

    def adjust(self, input_ids: Tensor, cache: Any, output: LMOutput) -> LMOutput:
        if self.fail:
            raise RuntimeError("scripted failure")
        logits = output.logits.clone()
        if cache is not None:
            self.step = 0 if input_ids.shape[1] > 1 else self.step
            logits[:, -1] = float("-inf")
            logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 0.0
            self.step += 1
            time.sleep(self.delay)
        return LMOutput(logits)


class ChatRecorder:
    """ASGI middleware keeping the Authorization header and JSON body of every chat request."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
        self.requests.append((authorization, json.loads(body)))

        replayed = False

        async def replay() -> Message:  # the body once, then the real stream (disconnects)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class SplitCharacters:
    """ASGI middleware that sends every streamed body part in two pieces, cut inside its first multi-byte
    UTF-8 character, with a pause in between, so the browser reads half a character per network chunk."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def split(message: Message) -> None:
            body = message.get("body", b"")
            cut = next((i for i, byte in enumerate(body) if 0x80 <= byte < 0xC0), None)
            if message["type"] == "http.response.body" and message.get("more_body") and cut:
                await send({**message, "body": body[:cut]})
                await asyncio.sleep(0.01)
                message = {**message, "body": body[cut:]}
            await send(message)

        await self.app(scope, receive, split)


tokenizer = serve_helpers.bpe_768


@pytest.fixture(scope="module")
def model() -> ScriptedModel:
    return ScriptedModel(tiny_llama(768, 1024, layers=1))


class Server:
    """The app (behind the recording and character-splitting middlewares) on a loopback port."""

    def __init__(self, model: ScriptedModel, tokenizer: BPETokenizer):
        self.app = app_for(model, tokenizer, max_tokens_cap=CAP, api_keys=(KEY,))
        self.recorder = ChatRecorder(self.app)
        self._serving = loopback(SplitCharacters(self.recorder))

    def __enter__(self) -> Server:
        self.base = self._serving.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._serving.__exit__(*exc)


@pytest.fixture(scope="module")
def server(model: ScriptedModel, tokenizer: BPETokenizer) -> Iterator[Server]:
    with Server(model, tokenizer) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=400,800"):
        options.add_argument(argument)  # 400 px wide: a phone
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: WebDriver, server: Server, model: ScriptedModel) -> WebDriver:
    """A freshly loaded page, the model answering with `<|im_end|>` at once until a test scripts it."""
    model.script, model.fail, model.delay = [IM_END_ID], False, 0.0
    server.recorder.requests.clear()
    browser.get(server.base + "/")
    return browser


def script(model: ScriptedModel, tokenizer: BPETokenizer, text: str) -> None:
    model.script = [*tokenizer.encode(text), IM_END_ID]


def fill(driver: WebDriver, element_id: str, text: str) -> None:
    """Set a field the way typing does (input and change events), Ethiopic included."""
    driver.execute_script(
        "const field = document.getElementById(arguments[0]); field.value = arguments[1];"
        " field.dispatchEvent(new Event('input')); field.dispatchEvent(new Event('change'));",
        element_id,
        text,
    )


def shown_error(driver: WebDriver) -> str:
    return driver.execute_script(
        "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent;"
    )


def model_loaded(driver: WebDriver) -> bool:
    return driver.execute_script("return document.getElementById('model').textContent") == NAME


def send(driver: WebDriver, text: str) -> list[dict[str, Any]]:
    """Send `text` and wait for the turn to end; each message shown: {kind, text, calls, note}."""
    answers = len(driver.find_elements("css selector", ".message.assistant"))
    fill(driver, "input", text)
    driver.find_element("id", "send").click()
    WebDriverWait(driver, 15).until(
        lambda d: (
            shown_error(d)
            or (
                len(d.find_elements("css selector", ".message.assistant")) > answers
                and d.find_element("id", "send").is_enabled()
            )
        )
    )
    return messages(driver)


def messages(driver: WebDriver) -> list[dict[str, Any]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('.message')].map(m => {"
        " const calls = m.querySelector('.tool-calls');"
        " return {kind: m.classList[1], text: m.querySelector('.text').textContent,"
        " note: m.querySelector('.note').textContent, calls: calls.hidden ? null : calls.textContent}; });"
    )


def test_page_is_public_with_a_strict_policy(server: Server) -> None:
    page = httpx2.get(server.base + "/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert '<meta charset="utf-8">' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx2.get(server.base + asset).status_code == 200
    assert httpx2.get(server.base + "/v1/models").status_code == 401  # the API itself stays closed
    assert "/" not in server.app.openapi()["paths"]


def test_streamed_turns_send_the_history(
    page: WebDriver, server: Server, model: ScriptedModel, tokenizer: BPETokenizer
) -> None:
    WebDriverWait(page, 10).until(lambda d: "API key" in shown_error(d))  # the model list needs the key
    fill(page, "api-key", KEY)
    WebDriverWait(page, 10).until(model_loaded)
    assert shown_error(page) == ""
    fill(page, "system", SYSTEM)
    fill(page, "temperature", "0")
    fill(page, "max-tokens", "60")
    script(model, tokenizer, ANSWER)
    question = "ሰላም፣ እንዴት ነህ?"
    shown = send(page, question)
    assert shown_error(page) == ""
    assert [m["kind"] for m in shown] == ["user", "assistant"] and shown[0]["text"] == question
    authorization, first = server.recorder.requests[-1]
    assert authorization == f"Bearer {KEY}"
    assert first["model"] == NAME and first["stream"] is True
    assert first["temperature"] == 0 and first["max_tokens"] == 60
    assert first["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    plain = httpx2.post(
        server.base + "/v1/chat/completions",
        json={**first, "stream": False},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    # the halves of split characters were joined: the streamed text equals the plain answer, no U+FFFD
    assert shown[1]["text"] == plain["choices"][0]["message"]["content"] == ANSWER
    text_style = page.execute_script(
        "const t = document.querySelector('.message.assistant .text');"
        " return [t.closest('[lang]').lang, getComputedStyle(t).fontFamily, document.characterSet,"
        " document.documentElement.scrollWidth <= window.innerWidth];"
    )
    assert text_style[0] == "am" and text_style[1].startswith('"Noto Sans Ethiopic"')
    assert text_style[2] == "UTF-8" and text_style[3]  # no sideways scrolling at phone width

    script(model, tokenizer, SECOND)
    follow_up = "ስለ ኢትዮጵያ ንገረኝ።"
    shown = send(page, follow_up)
    assert [m["text"] for m in shown] == [question, ANSWER, follow_up, SECOND]
    assert page.find_elements("css selector", "#log b") == []
    assert server.recorder.requests[-1][1]["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": follow_up},
    ]


def test_tool_calls_are_shown_and_answered(
    page: WebDriver, server: Server, model: ScriptedModel, tokenizer: BPETokenizer
) -> None:
    fill(page, "api-key", KEY)
    fill(page, "max-tokens", str(CAP))
    fill(page, "tools", json.dumps([WEATHER_TOOL], ensure_ascii=False))
    script(model, tokenizer, "እሺ።\n" + CALL)
    shown = send(page, "በአዲስ አበባ የአየር ሁኔታ?")
    assert shown_error(page) == ""
    (call,) = json.loads(shown[1]["calls"])
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "አዲስ አበባ", "days": 2}
    assert shown[1]["text"] == "እሺ።\n"
    assert page.find_element("id", "input-label").text.startswith("Result of get_weather")
    script(model, tokenizer, "ፀሐያማ ነው።")
    shown = send(page, "ፀሐያማ፣ 24°C")
    assert [m["kind"] for m in shown] == ["user", "assistant", "tool", "assistant"]
    assert shown[3]["text"] == "ፀሐያማ ነው።"
    sent = server.recorder.requests[-1][1]
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call["id"]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call["id"], "content": "ፀሐያማ፣ 24°C"}


def test_errors_are_shown_and_the_turn_can_be_retried(
    page: WebDriver, server: Server, model: ScriptedModel, tokenizer: BPETokenizer
) -> None:
    fill(page, "api-key", "wrong")
    send(page, "ሰላም")
    assert "401" in shown_error(page) and "API key" in shown_error(page)
    fill(page, "api-key", KEY)
    WebDriverWait(page, 10).until(model_loaded)
    fill(page, "max-tokens", "1000")  # above the server's cap: an OpenAI error body, status 400
    send(page, "ሰላም")
    assert "400" in shown_error(page) and f"at most {CAP}" in shown_error(page)
    model.fail = True  # the error arrives as an event inside the stream
    fill(page, "max-tokens", "60")
    send(page, "ሰላም")
    assert "Internal error during generation" in shown_error(page)
    # a failed turn is undone: nothing shown, the text is back in the box for a retry that works
    assert messages(page) == [] and page.find_element("id", "input").get_attribute("value") == "ሰላም"
    model.fail = False
    script(model, tokenizer, SECOND)
    shown = send(page, "ሰላም")
    assert shown_error(page) == "" and [m["text"] for m in shown] == ["ሰላም", SECOND]
    assert server.recorder.requests[-1][1]["messages"] == [{"role": "user", "content": "ሰላም"}]


def test_stop_keeps_the_partial_answer(
    page: WebDriver, server: Server, model: ScriptedModel, tokenizer: BPETokenizer
) -> None:
    fill(page, "api-key", KEY)
    WebDriverWait(page, 10).until(model_loaded)
    script(model, tokenizer, ANSWER * 3)
    model.delay = 0.1
    fill(page, "max-tokens", "60")
    fill(page, "input", "ሰላም")
    page.find_element("id", "send").click()
    WebDriverWait(page, 10).until(lambda d: len(messages(d)) == 2 and messages(d)[1]["text"])
    page.find_element("id", "stop").click()
    WebDriverWait(page, 5).until(lambda d: d.find_element("id", "send").is_enabled())
    partial = messages(page)[1]
    assert partial["note"] == "(stopped)" and (ANSWER * 3).startswith(partial["text"])
    assert len(partial["text"]) < len(ANSWER * 3) and shown_error(page) == ""
    time.sleep(0.3)
    assert messages(page)[1]["text"] == partial["text"]  # nothing arrives after Stop
