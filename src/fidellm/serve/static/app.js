// The fidel-lm chat page: streams POST /v1/chat/completions and keeps the conversation in the page,
// sending all of it each turn. Model output reaches the page only through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);

const chat = {
  messages: [], // the conversation so far as OpenAI messages (the system prompt is added per request)
  pendingCalls: [], // tool calls of the last assistant turn still waiting for their results
  model: null, // the served model's id, from GET /v1/models
  controller: null, // aborts the running request (Stop)
};

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

/** "STATUS: message" of an OpenAI error body, or the bare HTTP status when the body is something else. */
async function errorText(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${response.status}: ${message}`;
  } catch (_) {
    // not OpenAI error JSON
  }
  return `${response.status} ${response.statusText}`.trim();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModel() {
  chat.model = null;
  $("model").textContent = "…";
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("model").textContent = "unknown";
    throw new Error(`Could not list the models: ${await errorText(response)}`);
  }
  chat.model = (await response.json()).data[0].id;
  $("model").textContent = chat.model;
}

function refreshModel() {
  loadModel().then(() => showError(""), (error) => showError(error.message));
}

/**
 * The data of each server-sent event of `response`, as it arrives. The decoder runs in stream mode,
 * so a multi-byte character (Ethiopic letters are 3 bytes) split across network chunks is joined
 * rather than replaced by U+FFFD.
 */
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      // a trailing "\r" may be the first half of "\r\n": keep it for the next chunk
      const end = !done && buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, end).split(/\r\n|\r|\n/);
      buffer = done ? "" : lines.pop() + buffer.slice(end);
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
      if (done) {
        if (data.length) yield data.join("\n");
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseTools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (error) {
    throw new Error(`Tools are not valid JSON: ${error.message}`);
  }
  if (!Array.isArray(tools)) throw new Error("Tools must be a JSON array of tool objects.");
  return tools;
}

function requestBody(tools) {
  const system = $("system").value;
  const body = {
    model: chat.model,
    messages: system.trim() ? [{ role: "system", content: system }, ...chat.messages] : [...chat.messages],
    stream: true,
  };
  const temperature = $("temperature").valueAsNumber;
  const maxTokens = $("max-tokens").valueAsNumber;
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  if (tools) body.tools = tools;
  return body;
}

/** A message bubble: {node, text, calls, note}; every part is filled with textContent only. */
function addMessage(label, kind, text) {
  const node = document.createElement("article");
  node.className = `message ${kind}`;
  const role = document.createElement("div");
  role.className = "role";
  role.lang = "en";
  role.textContent = label;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const calls = document.createElement("pre");
  calls.className = "tool-calls";
  calls.hidden = true;
  const note = document.createElement("div");
  note.className = "note";
  note.lang = "en";
  node.append(role, body, calls, note);
  $("log").append(node);
  window.scrollTo(0, document.body.scrollHeight);
  return { node, text: body, calls, note };
}

function applyDelta(answer, delta) {
  if (!delta) return;
  if (delta.content) answer.content += delta.content;
  for (const part of delta.tool_calls || []) {
    answer.calls[part.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
    const call = answer.calls[part.index];
    if (part.id) call.id = part.id;
    if (part.function?.name) call.function.name = part.function.name;
    if (part.function?.arguments) call.function.arguments += part.function.arguments;
  }
}

function readableCall(call) {
  let args = call.function.arguments;
  try {
    args = JSON.parse(args);
  } catch (_) {
    // still streaming, or not JSON: show the raw string
  }
  return { id: call.id, name: call.function.name, arguments: args };
}

function render(view, answer) {
  const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 48;
  view.text.textContent = answer.content;
  if (answer.calls.length) {
    view.calls.hidden = false;
    view.calls.textContent = JSON.stringify(answer.calls.map(readableCall), null, 2);
  }
  if (atBottom) window.scrollTo(0, document.body.scrollHeight);
}

function updateComposer() {
  const call = chat.pendingCalls[0];
  $("input-label").textContent = call ? `Result of ${call.function.name} (${call.id})` : "Message";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

/** Streams the assistant's answer into `view`: {answer, finish, error, complete}. */
async function stream(view, tools) {
  const answer = { content: "", calls: [] };
  const outcome = { answer, finish: null, error: null, complete: false };
  chat.controller = new AbortController();
  setBusy(true);
  view.node.setAttribute("aria-busy", "true"); // screen readers read the answer once it is complete
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(tools)),
      signal: chat.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") {
        outcome.complete = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`Error during generation: ${chunk.error.message}`);
      for (const choice of chunk.choices || []) {
        applyDelta(answer, choice.delta);
        outcome.finish = choice.finish_reason || outcome.finish;
      }
      render(view, answer);
    }
    if (!outcome.complete) outcome.error = "The stream ended before the answer was complete.";
  } catch (error) {
    if (error.name !== "AbortError") outcome.error = error.message;
  } finally {
    chat.controller = null;
    setBusy(false);
    view.node.removeAttribute("aria-busy");
  }
  return outcome;
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || chat.controller) return;
  showError("");
  let tools;
  try {
    tools = parseTools();
    if (!chat.model) await loadModel();
  } catch (error) {
    showError(error.message);
    return;
  }
  const conversation = chat.messages;
  const before = { length: conversation.length, pending: [...chat.pendingCalls] };
  const call = chat.pendingCalls.shift();
  conversation.push(call ? { role: "tool", tool_call_id: call.id, content: text } : { role: "user", content: text });
  const added = [addMessage(call ? `Result of ${call.function.name}` : "You", call ? "tool" : "user", text)];
  $("input").value = "";
  updateComposer();
  if (chat.pendingCalls.length) return; // the model answers once every call has its result
  const view = addMessage("Assistant", "assistant", "");
  added.push(view);
  const { answer, finish, error, complete } = await stream(view, tools);
  if (conversation !== chat.messages) return; // "New chat" was pressed meanwhile
  if (error || (!complete && !answer.content && !answer.calls.length)) {
    // failed, or stopped before any output: undo the turn and give the text back for a retry
    conversation.splice(before.length);
    chat.pendingCalls = before.pending;
    for (const part of added) part.node.remove();
    $("input").value = text;
    updateComposer();
    showError(error || "");
    return;
  }
  const reply = { role: "assistant", content: answer.content || (answer.calls.length ? null : "") };
  if (answer.calls.length) reply.tool_calls = answer.calls;
  conversation.push(reply);
  chat.pendingCalls = [...answer.calls];
  updateComposer();
  if (!complete) view.note.textContent = "(stopped)";
  else if (finish === "length") view.note.textContent = "(cut off at the max tokens limit)";
}

function reset() {
  chat.controller?.abort();
  chat.messages = [];
  chat.pendingCalls = [];
  $("log").replaceChildren();
  showError("");
  updateComposer();
}

$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", () => chat.controller?.abort());
$("reset").addEventListener("click", reset);
$("api-key").addEventListener("change", refreshModel);
$("input").addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line; an input method still composing (Amharic keyboards) keeps Enter
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
refreshModel();
