// lmforge chat page: plain JS, no build step. Talks to this server's /v1/chat/completions with stream=true and
// renders the reply as it streams, as markdown (vendor/marked) made safe by vendor/DOMPurify. The conversation
// and the settings live in this browser's localStorage, so a reload keeps them.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed", "api_key"];
const STORE = "lmforge.conversation";
let conversation = [];  // finished turns: {role, content, reasoning?, meta?}
let controller = null;  // AbortController of the reply being streamed
let modelsReady = false;

function loadSettings() {
  for (const id of SETTINGS) {
    const v = localStorage.getItem("lmforge." + id);
    if (v !== null) $(id).value = v;
  }
}

function saveSettings() {
  for (const id of SETTINGS) localStorage.setItem("lmforge." + id, $(id).value);
}

function saveConversation() {
  localStorage.setItem(STORE, JSON.stringify(conversation));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// A reply is untrusted text: marked makes HTML of its markdown, DOMPurify strips anything executable from it.
function renderMarkdown(el, text) {
  if (window.marked && window.DOMPurify) {
    el.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: true }));
  } else {
    el.textContent = text;
  }
}

function addBubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("messages").appendChild(div);
  return div;
}

// The parts of an assistant bubble: optional reasoning (collapsible), the content, the meta line.
function assistantParts(bubble) {
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "reasoning";
  const thoughts = document.createElement("div");
  reasoning.append(summary, thoughts);
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("span");
  meta.className = "meta";
  bubble.append(reasoning, content, meta);
  return { reasoning, thoughts, content, meta };
}

function showMessage(msg) {
  const bubble = addBubble(msg.role);
  if (msg.role === "assistant") {
    const parts = assistantParts(bubble);
    if (msg.reasoning) {
      parts.reasoning.hidden = false;
      parts.thoughts.textContent = msg.reasoning;
    }
    renderMarkdown(parts.content, msg.content);
    parts.meta.textContent = msg.meta || "";
  } else {
    bubble.textContent = msg.content;
  }
  return bubble;
}

function showError(text) {
  const div = addBubble("error");
  div.textContent = text;
  div.scrollIntoView({ block: "end" });
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

function needKey(message) {
  modelsReady = false;
  $("auth").hidden = false;
  $("auth-error").hidden = !message;
  $("auth-error").textContent = message || "";
  $("send").disabled = true;
  $("status").textContent = "this server needs an API key: enter it above";
  $("auth_key").focus();
}

function showDefaults(card) {
  const d = (card && card.generation_defaults) || {};
  $("temperature").placeholder = "temperature" in d ? `model: ${d.temperature}` : "server: 1.0";
  $("top_p").placeholder = "top_p" in d ? `model: ${d.top_p}` : "server: 1.0";
  const list = Object.entries(d).map(([k, v]) => `${k} ${v}`).join(", ");
  $("defaults").textContent = list
    ? `Empty fields use the model's defaults: ${list}.`
    : "The model sets no sampling defaults: empty fields use the server's (temperature 1, top_p 1).";
}

async function loadModels() {
  const select = $("model");
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.status === 401) {
      needKey($("api_key").value.trim() ? "that key was refused; check it and try again" : "");
      return;
    }
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    select.innerHTML = "";
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      select.appendChild(opt);
    }
    showDefaults(body.data[0]);
    modelsReady = true;
    $("auth").hidden = true;
    $("send").disabled = false;
    $("status").textContent = `ready: ${body.data.map((m) => m.id).join(", ")}`;
  } catch (e) {
    $("status").textContent = `could not list models (${e.message})`;
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conversation) messages.push({ role: m.role, content: m.content });
  const body = {
    model: $("model").value, messages, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max_tokens").value),
  };
  // unset fields are left out, so the model's own defaults apply
  for (const id of ["temperature", "top_p", "seed"]) if ($(id).value !== "") body[id] = Number($(id).value);
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
  $("send").disabled = busy || !modelsReady;
  $("stop").hidden = !busy;
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  const body = requestBody();
  showMessage({ role: "user", content: text }).scrollIntoView({ block: "end" });
  let bubble = null, parts = null;
  let reply = "", thinking = "", chunks = 0, usage = null, finish = null, first = null;
  const start = performance.now();
  controller = new AbortController();
  setBusy(true);
  const metaText = () => {
    const tokens = usage ? usage.completion_tokens : chunks;
    const secs = first === null ? 0 : (performance.now() - first) / 1000;
    const rate = secs > 0 && tokens > 1 ? ((tokens - 1) / secs).toFixed(1) : "-";
    const ttft = first === null ? "-" : ((first - start) / 1000).toFixed(2) + " s";
    return `${tokens} tokens · ${rate} tok/s · first token ${ttft}` + (finish ? ` · ${finish}` : "");
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (resp.status === 401) {
      needKey("the server refused the key");
      throw new Error(await errorText(resp));
    }
    if (!resp.ok) throw new Error(await errorText(resp));
    bubble = addBubble("assistant");  // only once the server accepted: a refused request leaves no empty card
    bubble.classList.add("streaming");
    parts = assistantParts(bubble);
    await readEvents(resp, (data) => {
      if (data.error) throw new Error(data.error.message);
      if (data.usage) usage = data.usage;
      for (const choice of data.choices || []) {
        const delta = choice.delta || {};
        if (delta.content || delta.reasoning_content) {
          if (first === null) first = performance.now();
          chunks += 1;
        }
        if (delta.reasoning_content) {
          thinking += delta.reasoning_content;
          parts.reasoning.hidden = false;
          parts.reasoning.open = true;
          parts.thoughts.textContent = thinking;
        }
        if (delta.content) {
          reply += delta.content;
          renderMarkdown(parts.content, reply);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      parts.meta.textContent = metaText();
      $("status").textContent = parts.meta.textContent;
      bubble.scrollIntoView({ block: "end" });
    });
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else showError(e.message);
  } finally {
    controller = null;
    if (bubble) {
      bubble.classList.remove("streaming");
      parts.reasoning.open = false;
      renderMarkdown(parts.content, reply);
      parts.meta.textContent = metaText();
      $("status").textContent = parts.meta.textContent;
    }
    if (reply || thinking) {
      conversation.push({ role: "assistant", content: reply, reasoning: thinking || undefined, meta: metaText() });
    } else {
      conversation.pop();  // nothing came back: drop the turn so the next one starts clean
      if (bubble) bubble.remove();
    }
    saveConversation();
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller || !modelsReady) return;
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
  conversation = [];
  saveConversation();
  $("messages").innerHTML = "";
});
$("settings-toggle").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
});
$("auth-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  $("api_key").value = $("auth_key").value.trim();
  saveSettings();
  loadModels();
});
for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
$("api_key").addEventListener("change", loadModels);

loadSettings();
try {
  conversation = JSON.parse(localStorage.getItem(STORE) || "[]");
} catch (e) {
  conversation = [];
}
for (const msg of conversation) showMessage(msg);
$("send").disabled = true;
loadModels();
