// textgen playground: a plain client of the server's public API (no build step, no dependencies).
// Calls: GET /health (progress while the model builds), GET /info (model and limits),
// POST /v1/completions and /v1/chat/completions (streamed, with logprobs), and a non-streamed
// /v1/completions with echo for the prompt tokens' logprobs.
"use strict";

const KEY_STORAGE = "textgen-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  controller: null, // AbortController of the running generation
  messages: [], // chat history: {role, content}
};

// ---------- API access ----------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function errorMessage(body, status) {
  if (body && body.error) {
    return typeof body.error === "string" ? body.error : body.error.message || JSON.stringify(body.error);
  }
  return `HTTP ${status}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (response.status === 401) {
    askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was refused." : "");
    throw new HttpError(401, "An API key is required.");
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new HttpError(response.status, errorMessage(body, response.status));
  }
  return response;
}

async function* sse(response) {
  // Server-sent events: yields each `data:` payload parsed as JSON, stops at [DONE].
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---------- startup: health, key, info ----------

function setStatus(text) {
  $("server-status").textContent = text;
}

async function waitUntilHealthy() {
  for (;;) {
    let body = null;
    let ok = false;
    try {
      const response = await fetch("/health");
      ok = response.ok;
      body = await response.json();
    } catch (_) {
      setStatus("Server unreachable; retrying…");
    }
    if (ok) {
      $("building").hidden = true;
      return;
    }
    if (body && body.status === "building" && body.progress) {
      showBuilding(body);
    } else if (body) {
      setStatus(`Not ready: ${body.detail}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function showBuilding(body) {
  const p = body.progress;
  $("building").hidden = false;
  $("building-detail").textContent = body.detail;
  $("building-progress").value = p.fraction;
  $("building-progress").textContent = `${Math.round(p.fraction * 100)}%`;
  setStatus(`Building the model: ${Math.round(p.fraction * 100)}%`);
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  setStatus("API key required");
  $("api-key").focus();
}

async function loadInfo() {
  const response = await api("/info");
  const info = await response.json();
  state.info = info;
  $("key-form").hidden = true;
  $("model-name").textContent = info.model_id;
  const maxNew = Math.max(1, (info.max_total_tokens || 2) - 1);
  $("max_tokens").max = String(maxNew);
  if (Number($("max_tokens").value) > maxNew) $("max_tokens").value = String(maxNew);
  $("min_tokens").max = String(maxNew);
  $("stop-limit").textContent = `up to ${info.max_stop_sequences}`;
  const chat = Boolean(info.chat_template);
  $("mode-chat").disabled = !chat;
  $("chat-note").hidden = chat;
  if (chat) {
    $("mode-chat").checked = true;
  }
  applyMode();
  setStatus(`Ready · context ${info.context_length} tokens`);
}

async function start() {
  await waitUntilHealthy();
  for (;;) {
    try {
      await loadInfo();
      return;
    } catch (err) {
      if (err.status === 401) return; // the key form takes over; submitting it calls loadInfo
      setStatus(`Cannot read /info: ${err.message}; retrying…`);
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

// ---------- the form ----------

function mode() {
  if ($("mode-decide").checked) return "decide";
  return $("mode-chat").checked ? "chat" : "completion";
}

function applyMode() {
  const chat = mode() === "chat";
  const decide = mode() === "decide";
  $("chat-only").hidden = !chat;
  $("decide-only").hidden = !decide;
  $("sampling").disabled = decide;
  $("prompt-label").textContent = chat ? "Your message" : decide ? "Input" : "Prompt";
  $("generate").textContent = decide ? "Decide" : "Generate";
  $("echo").disabled = chat;
}

// ---------- Decide mode: POST /v1/decisions, one probability bar per option ----------

function optionRow(label, probability) {
  const row = document.createElement("div");
  row.className = "option";
  const name = document.createElement("span");
  name.className = "option-label";
  name.textContent = label;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "1");
  bar.setAttribute("aria-valuenow", String(probability));
  bar.setAttribute("aria-label", `${label}: ${(probability * 100).toFixed(1)}%`);
  const fill = document.createElement("span");
  fill.style.width = `${(probability * 100).toFixed(2)}%`;
  bar.append(fill);
  const value = document.createElement("span");
  value.className = "option-value";
  value.textContent = `${(probability * 100).toFixed(1)}%`;
  row.append(name, bar, value);
  return row;
}

function showAnswer(answer, index) {
  const box = document.createElement("section");
  box.className = "decision";
  const title = document.createElement("h3");
  let summary = "";
  let rows;
  if (answer.type === "predicate") {
    rows = [["true", answer.probability], ["false", 1 - answer.probability]];
  } else if (answer.type === "choice") {
    summary = ` → ${JSON.stringify(answer.choice)} (confidence ${(answer.confidence * 100).toFixed(1)}%)`;
    rows = answer.probabilities.map((p) => [JSON.stringify(p.value), p.probability]);
  } else if (answer.type === "score") {
    summary = ` → score ${answer.score.toFixed(2)}`;
    rows = answer.probabilities.map((p) => [`${p.value}: ${p.label}`, p.probability]);
  } else {
    rows = [];
    summary = " → refused";
  }
  title.textContent = `${answer.name || `Question ${index + 1}`} (${answer.type})${summary}`;
  box.append(title, ...rows.map(([label, p]) => optionRow(label, p)));
  return box;
}

async function decide() {
  let questions;
  try {
    questions = JSON.parse($("questions").value);
  } catch (err) {
    $("form-error").textContent = `Questions are not valid JSON: ${err.message}`;
    return;
  }
  resetOutput();
  setRunning(true);
  const started = performance.now();
  try {
    const body = { model: state.info.model_id, input: $("prompt").value, questions };
    const response = await api("/v1/decisions", { method: "POST", body: JSON.stringify(body) });
    const decision = await response.json();
    $("decisions").replaceChildren(...decision.answers.map(showAnswer));
    $("stat-prompt").textContent = String(decision.usage.input_tokens);
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } catch (err) {
    $("form-error").textContent = err.message;
    setStatus("Request failed");
  } finally {
    setRunning(false);
  }
}

function numberField(id, { integer = false, optional = false } = {}) {
  const el = $(id);
  const label = document.querySelector(`label[for="${id}"]`).textContent;
  if (el.value.trim() === "") {
    if (optional) return undefined;
    throw new Error(`${label}: enter a number`);
  }
  const value = Number(el.value);
  const min = el.min === "" ? -Infinity : Number(el.min);
  const max = el.max === "" ? Infinity : Number(el.max);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) || value < min || value > max) {
    const range = `${Number.isFinite(min) ? min : "…"} to ${Number.isFinite(max) ? max : "…"}`;
    throw new Error(`${label}: must be ${integer ? "a whole number" : "a number"} from ${range}`);
  }
  return value;
}

function stopStrings() {
  const stops = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  const limit = state.info ? state.info.max_stop_sequences : 8;
  if (stops.length > limit) throw new Error(`Stop strings: at most ${limit}`);
  return stops;
}

function samplingBody() {
  const body = {
    model: state.info.model_id,
    max_tokens: numberField("max_tokens", { integer: true }),
    temperature: numberField("temperature"),
    top_p: numberField("top_p"),
    top_k: numberField("top_k", { integer: true }),
    min_tokens: numberField("min_tokens", { integer: true }),
    repetition_penalty: numberField("repetition_penalty"),
    presence_penalty: numberField("presence_penalty"),
    frequency_penalty: numberField("frequency_penalty"),
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = numberField("seed", { integer: true, optional: true });
  if (seed !== undefined) body.seed = seed;
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  return body;
}

// ---------- token view ----------

function tokenSpan(text, logprob, top) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.tabIndex = 0;
  const known = typeof logprob === "number";
  span.style.setProperty("--p", known ? String(Math.exp(logprob)) : "1");
  span.dataset.logprob = known ? String(logprob) : "";
  span.tokenTop = top || [];
  span.setAttribute("aria-describedby", "tip");
  return span;
}

function percent(logprob) {
  const p = Math.exp(logprob) * 100;
  return p >= 10 ? `${p.toFixed(1)}%` : p >= 0.01 ? `${p.toFixed(2)}%` : `${p.toExponential(1)}%`;
}

function visible(text) {
  // Whitespace and control characters made visible in the tooltip.
  return JSON.stringify(text).slice(1, -1);
}

function showTip(span) {
  const tip = $("tip");
  tip.replaceChildren();
  const head = document.createElement("div");
  const code = document.createElement("code");
  code.textContent = visible(span.textContent);
  head.append("Token ", code, span.dataset.logprob ? ` · ${percent(Number(span.dataset.logprob))}` : " · first prompt token (no probability)");
  tip.append(head);
  if (span.tokenTop.length) {
    const table = document.createElement("table");
    const caption = document.createElement("caption");
    caption.textContent = "Alternatives";
    caption.className = "note";
    table.append(caption);
    for (const alt of span.tokenTop) {
      const row = table.insertRow();
      if (alt.text === span.textContent) row.className = "chosen";
      const t = row.insertCell();
      const c = document.createElement("code");
      c.textContent = visible(alt.text);
      t.append(c);
      const p = row.insertCell();
      p.className = "p";
      p.textContent = percent(alt.logprob);
    }
    tip.append(table);
  }
  const box = span.getBoundingClientRect();
  tip.hidden = false;
  tip.style.left = `${Math.max(4, box.left + window.scrollX)}px`;
  tip.style.top = `${box.bottom + window.scrollY + 4}px`;
}

function hideTip() {
  $("tip").hidden = true;
}

function completionTop(top) {
  // /v1/completions gives {text: logprob}; /v1/chat/completions a list of {token, logprob}.
  if (!top) return [];
  return Object.entries(top)
    .map(([text, logprob]) => ({ text, logprob }))
    .sort((a, b) => b.logprob - a.logprob);
}

function chatTop(list) {
  return (list || []).map((e) => ({ text: e.token, logprob: e.logprob })).sort((a, b) => b.logprob - a.logprob);
}

// ---------- generation ----------

function resetOutput() {
  $("output").replaceChildren();
  $("decisions").replaceChildren();
  $("prompt-tokens").replaceChildren();
  for (const id of ["stat-ttft", "stat-tps", "stat-prompt", "stat-generated", "stat-finish"]) $(id).textContent = "–";
  hideTip();
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  $("output").dataset.state = running ? "streaming" : "done";
}

async function showPromptTokens(prompt, topN) {
  // A one-token completion with echo returns the prompt's tokens with their logprobs.
  const body = { model: state.info.model_id, prompt, max_tokens: 1, echo: true, logprobs: topN, temperature: 0 };
  const response = await api("/v1/completions", { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
  const data = await response.json();
  const lp = data.choices[0].logprobs;
  const n = data.usage.prompt_tokens;
  const spans = [];
  for (let i = 0; i < n && i < lp.tokens.length; i++) {
    spans.push(tokenSpan(lp.tokens[i], lp.token_logprobs[i], completionTop(lp.top_logprobs[i])));
  }
  $("prompt-tokens").replaceChildren(...spans);
}

function appendHistory(role, content) {
  const li = document.createElement("li");
  const r = document.createElement("span");
  r.className = "role";
  r.textContent = `${role}: `;
  li.append(r, content);
  $("history").append(li);
}

async function generate() {
  $("form-error").textContent = "";
  if (!state.info) {
    $("form-error").textContent = "The server is not ready yet.";
    return;
  }
  let body;
  let topN;
  try {
    body = samplingBody();
    topN = numberField("top_n", { integer: true });
  } catch (err) {
    $("form-error").textContent = err.message;
    return;
  }
  if (mode() === "decide") return decide();
  const prompt = $("prompt").value;
  const chat = mode() === "chat";
  let path;
  if (chat) {
    const messages = [];
    if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
    messages.push(...state.messages, { role: "user", content: prompt });
    Object.assign(body, { messages, logprobs: true, top_logprobs: topN });
    path = "/v1/chat/completions";
  } else {
    Object.assign(body, { prompt, logprobs: topN });
    path = "/v1/completions";
  }
  resetOutput();
  state.controller = new AbortController();
  setRunning(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let generated = 0;
  let reply = "";
  let finish = null;
  try {
    if (!chat && $("echo").checked) await showPromptTokens(prompt, topN);
    const sent = performance.now();
    const response = await api(path, { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    setStatus("Generating…");
    for await (const chunk of sse(response)) {
      if (chunk.error) throw new Error(errorMessage(chunk, 0));
      if (chunk.usage) $("stat-prompt").textContent = String(chunk.usage.prompt_tokens);
      for (const choice of chunk.choices || []) {
        const tokens = chat ? chatTokens(choice) : completionTokens(choice);
        for (const t of tokens) {
          const now = performance.now();
          if (first === null) {
            first = now;
            $("stat-ttft").textContent = `${Math.round(first - sent)} ms`;
          }
          last = now;
          generated += 1;
          $("output").append(tokenSpan(t.text, t.logprob, t.top));
        }
        reply += chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("stat-generated").textContent = String(generated);
      if (generated > 1) $("stat-tps").textContent = ((generated - 1) / ((last - first) / 1000)).toFixed(1);
    }
    $("stat-finish").textContent = finish || "–";
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
    if (chat) {
      state.messages.push({ role: "user", content: prompt }, { role: "assistant", content: reply });
      appendHistory("user", prompt);
      appendHistory("assistant", reply);
      $("prompt").value = "";
    }
  } catch (err) {
    if (err.name === "AbortError") {
      $("stat-finish").textContent = "stopped";
      setStatus("Stopped");
    } else {
      $("form-error").textContent = err.message;
      setStatus("Request failed");
    }
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

function completionTokens(choice) {
  const lp = choice.logprobs;
  if (!lp) return [];
  return lp.tokens.map((text, i) => ({ text, logprob: lp.token_logprobs[i], top: completionTop(lp.top_logprobs[i]) }));
}

function chatTokens(choice) {
  const content = choice.logprobs && choice.logprobs.content;
  if (!content) return [];
  return content.map((e) => ({ text: e.token, logprob: e.logprob, top: chatTop(e.top_logprobs) }));
}

function stop() {
  if (state.controller) state.controller.abort(); // closing the stream cancels the request on the server
}

// ---------- wiring ----------

document.addEventListener("DOMContentLoaded", () => {
  $("gen-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    state.messages = [];
    $("history").replaceChildren();
    resetOutput();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (!$("generate").disabled) generate();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      stop();
      hideTip();
    }
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
  $("boundaries").addEventListener("change", () => $("tokens").classList.toggle("boundaries", $("boundaries").checked));
  const tokens = $("tokens");
  tokens.addEventListener("mouseover", (e) => e.target.classList.contains("tok") && showTip(e.target));
  tokens.addEventListener("mouseout", hideTip);
  tokens.addEventListener("focusin", (e) => e.target.classList.contains("tok") && showTip(e.target));
  tokens.addEventListener("focusout", hideTip);
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    try {
      await loadInfo();
    } catch (err) {
      if (err.status !== 401) $("key-error").textContent = err.message;
    }
  });
  start();
});
