// lmforge chat page: plain JS, no build step. Talks to this server's /v1/chat/completions with stream=true
// and renders the reply token by token; the history lives in this page only.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed", "api_key"];
const history = [];  // [{role, content}] of finished turns
let controller = null;  // AbortController of the reply being streamed

function loadSettings() {
  for (const id of SETTINGS) {
    const v = localStorage.getItem("lmforge." + id);
    if (v !== null) $(id).value = v;
  }
}

function saveSettings() {
  for (const id of SETTINGS) localStorage.setItem("lmforge." + id, $(id).value);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

async function loadModels() {
  const select = $("model");
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    select.innerHTML = "";
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      select.appendChild(opt);
    }
    $("status").textContent = `ready: ${body.data.map((m) => m.id).join(", ")}`;
  } catch (e) {
    $("status").textContent = `could not list models (${e.message}); set the API key in settings if the server needs one`;
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Reads server-sent events from a fetch body; calls onData with each parsed JSON payload until [DONE].
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const meta = document.createElement("span");
  meta.className = "meta";
  let reply = "", chunks = 0, usage = null, finish = null, first = null;
  const start = performance.now();
  controller = new AbortController();
  setBusy(true);
  const render = () => {
    const now = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const secs = first === null ? 0 : (now - first) / 1000;
    const rate = secs > 0 && tokens > 1 ? ((tokens - 1) / secs).toFixed(1) : "-";
    const ttft = first === null ? "-" : ((first - start) / 1000).toFixed(2) + " s";
    meta.textContent = `${tokens} tokens · ${rate} tok/s · first token ${ttft}` + (finish ? ` · ${finish}` : "");
    $("status").textContent = meta.textContent;
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (data) => {
      if (data.error) throw new Error(data.error.message);
      if (data.usage) usage = data.usage;
      for (const choice of data.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (first === null) first = performance.now();
          reply += piece;
          chunks += 1;
          bubble.textContent = reply;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      render();
      bubble.appendChild(meta);
      bubble.scrollIntoView({ block: "end" });
    });
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      addMessage("error", e.message);
    }
  } finally {
    controller = null;
    bubble.classList.remove("streaming");
    render();
    bubble.textContent = reply;
    bubble.appendChild(meta);
    if (reply) history.push({ role: "assistant", content: reply });
    else history.pop();  // nothing came back: drop the turn so the next one starts clean
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").innerHTML = "";
});
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
$("api_key").addEventListener("change", loadModels);
loadSettings();
loadModels();
