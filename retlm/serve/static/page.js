// The page of `retlm serve`: search the database, and generate with retrieval on and off side by side,
// streamed, with the passages read at each retrieval step beside the text. Plain JavaScript, no library,
// no network beyond this server's JSON API.
"use strict";

const MIN_SHARED_WORDS = 4; // a highlighted span: this many words in a row, in the text and a passage
const $ = (id) => document.getElementById(id);
let modelId = null;
let running = [];

// ---- talking to the API ------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("retlm-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body, signal) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Server-sent events: calls onData(object) for each `data:` line until `data: [DONE]`.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

// ---- shared spans ------------------------------------------------------------------------------------
function words(text) {
  const found = [];
  const pattern = /[\p{L}\p{N}_]+/gu;
  let m;
  while ((m = pattern.exec(text)) !== null) {
    found.push({ w: m[0].toLowerCase(), s: m.index, e: m.index + m[0].length });
  }
  return found;
}

function toRanges(ws, marked) {
  const ranges = [];
  for (let i = 0; i < ws.length; i++) {
    if (!marked[i]) continue;
    const last = ranges[ranges.length - 1];
    if (last && marked[i - 1]) last[1] = ws[i].e;
    else ranges.push([ws[i].s, ws[i].e]);
  }
  return ranges;
}

// Character ranges of `a` and of `b` covered by runs of >= n words that occur in both.
function sharedRanges(a, b, n = MIN_SHARED_WORDS) {
  const wa = words(a), wb = words(b);
  const grams = new Map();
  for (let j = 0; j + n <= wb.length; j++) {
    const key = wb.slice(j, j + n).map((x) => x.w).join(" ");
    if (!grams.has(key)) grams.set(key, []);
    grams.get(key).push(j);
  }
  const ma = new Array(wa.length).fill(false), mb = new Array(wb.length).fill(false);
  for (let i = 0; i + n <= wa.length; i++) {
    const hits = grams.get(wa.slice(i, i + n).map((x) => x.w).join(" "));
    if (!hits) continue;
    for (let k = 0; k < n; k++) ma[i + k] = true;
    for (const j of hits) for (let k = 0; k < n; k++) mb[j + k] = true;
  }
  return [toRanges(wa, ma), toRanges(wb, mb)];
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// HTML for `text` with `ranges` in <mark>, `markers` ({pos, label}) inserted, and the first `grey`
// characters (the prompt) in a muted span.
function renderText(text, ranges, markers = [], grey = 0) {
  const inMark = new Array(text.length).fill(false);
  for (const [s, e] of ranges) for (let i = s; i < e && i < text.length; i++) inMark[i] = true;
  const at = new Map();
  for (const m of markers) {
    const pos = Math.min(Math.max(m.pos, 0), text.length);
    at.set(pos, (at.get(pos) || "") + `<sup class="marker" data-step="${m.label}">${m.label}</sup>`);
  }
  let html = grey > 0 ? '<span class="prompt">' : "";
  let marked = false;
  for (let i = 0; i <= text.length; i++) {
    if (at.has(i) || i === grey || i === text.length || inMark[i] !== marked) {
      if (marked) { html += "</mark>"; marked = false; }
    }
    if (i === grey && grey > 0) html += "</span>";
    if (at.has(i)) html += at.get(i);
    if (i === text.length) break;
    if (inMark[i] && !marked) { html += "<mark>"; marked = true; }
    html += escapeHtml(text[i]);
  }
  return html;
}

// ---- header, key --------------------------------------------------------------------------------------
async function loadModel() {
  try {
    const list = await (await api("/v1/models")).json();
    const model = list.data[0];
    modelId = model.id;
    const info = model.retlm || {};
    const db = info.database;
    let text = `model <b>${escapeHtml(model.id)}</b> · retrieval: ${escapeHtml(info.retrieval || "?")}`;
    if (db) text += ` · database: ${db.chunks} chunks from ${db.documents} documents (chunk ${db.chunk_size} tokens)`;
    $("model-info").innerHTML = text;
    $("key-form").hidden = true;
  } catch (err) {
    $("model-info").textContent = err.message;
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("retlm-api-key", $("api-key").value);
  loadModel();
});

// ---- search -------------------------------------------------------------------------------------------
$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("search-status");
  status.className = "status";
  status.textContent = "searching…";
  $("results").innerHTML = "";
  try {
    const started = performance.now();
    const found = await (await api("/v1/search", { query: $("query").value, k: Number($("k").value) })).json();
    for (const hit of found.data) {
      const item = document.createElement("li");
      item.className = "result";
      item.innerHTML =
        `<div class="meta"><b>${escapeHtml(hit.doc_name)}</b> · chunk ${hit.chunk_id} · ` +
        `score <span class="score">${hit.score.toFixed(3)}</span></div>` +
        `<pre class="passage">${escapeHtml(hit.text)}</pre>`;
      $("results").appendChild(item);
    }
    status.textContent = `${found.data.length} chunks in ${Math.round(performance.now() - started)} ms`;
  } catch (err) {
    status.className = "status error";
    status.textContent = err.message;
  }
});

// ---- generation ---------------------------------------------------------------------------------------
function requestBody(retrieval) {
  const prompt = $("prompt").value;
  const body = {
    model: modelId,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
    retrieval,
  };
  const penalty = Number($("repetition-penalty").value);
  if (penalty && penalty !== 1) body.repetition_penalty = penalty;
  if ($("endpoint").value === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

// One streamed generation into column `side` ("on" or "off"); `view` is redrawn as text and steps arrive.
async function generate(side, view, signal) {
  const chat = $("endpoint").value === "chat";
  const status = $("status-" + side);
  status.className = "status";
  status.textContent = "waiting…";
  const started = performance.now();
  try {
    const response = await api(chat ? "/v1/chat/completions" : "/v1/completions", requestBody(side === "on"), signal);
    status.textContent = "streaming…";
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const step of chunk.retrieval || []) view.steps.push(step);
      for (const choice of chunk.choices || []) {
        const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        view.completion += piece;
        if (choice.finish_reason) view.finish = choice.finish_reason;
      }
      if (chunk.usage) view.tokens = chunk.usage.completion_tokens;
      draw(view);
    });
    const seconds = (performance.now() - started) / 1000;
    status.textContent = `done: ${view.tokens} tokens in ${seconds.toFixed(1)} s (${view.finish || "?"})`;
    status.dataset.done = "1";
  } catch (err) {
    status.className = "status error";
    status.textContent = err.name === "AbortError" ? "stopped" : err.message;
    status.dataset.done = "1";
  }
}

function newView(side) {
  return { side, prompt: $("endpoint").value === "chat" ? "" : $("prompt").value, completion: "", steps: [], tokens: 0 };
}

function draw(view) {
  const text = view.prompt + view.completion;
  if (view.side === "off") {
    $("output-off").innerHTML = renderText(text, [], [], view.prompt.length);
    return;
  }
  let outputRanges = [];
  const stepsHtml = view.steps.map((step, i) => {
    const where = step.source === "prompt"
      ? `from the prompt (its first ${step.token_offset} tokens)`
      : `after ${step.text_offset} characters of the completion (${step.token_offset} tokens in all)`;
    const neighbors = step.neighbors.map((n) => {
      const [inText, inPassage] = sharedRanges(text, n.text);
      outputRanges = outputRanges.concat(inText);
      return `<div class="neighbor"><div class="meta"><b>${escapeHtml(n.doc_name)}</b> · chunk ${n.chunk_id} · ` +
        `score ${n.score.toFixed(3)}</div><pre class="passage">${renderText(n.text, inPassage)}</pre></div>`;
    }).join("");
    return `<div class="step" id="step-${i + 1}"><div class="step-head"><sup class="marker">${i + 1}</sup> ${where}` +
      `<div class="step-query">searched: “${escapeHtml(step.query)}”</div></div>${neighbors}</div>`;
  }).join("");
  const markers = view.steps.map((step, i) => ({
    pos: step.source === "prompt" ? view.prompt.length : view.prompt.length + step.text_offset,
    label: i + 1,
  }));
  $("output-on").innerHTML = renderText(text, outputRanges, markers, view.prompt.length);
  $("steps").innerHTML = stepsHtml || '<p class="status">no retrieval step yet</p>';
  $("status-passages").textContent = view.steps.length ? `${view.steps.length} retrieval steps` : "";
}

$("output-on").addEventListener("click", (event) => {
  const label = event.target.dataset && event.target.dataset.step;
  if (!label) return;
  document.querySelectorAll(".step.focus").forEach((el) => el.classList.remove("focus"));
  const card = $("step-" + label);
  if (card) { card.classList.add("focus"); card.scrollIntoView({ block: "nearest" }); }
});

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!modelId) await loadModel();
  const compare = $("compare").checked;
  $("columns").classList.toggle("single", !compare);
  for (const id of ["output-on", "output-off", "steps", "status-on", "status-off", "status-passages"]) {
    $(id).innerHTML = "";
    delete $(id).dataset.done;
  }
  const controller = new AbortController();
  $("generate-button").disabled = true;
  $("stop-button").disabled = false;
  $("stop-button").onclick = () => controller.abort();
  const sides = compare ? ["on", "off"] : ["on"];
  running = sides.map((side) => generate(side, newView(side), controller.signal));
  await Promise.all(running);
  $("generate-button").disabled = false;
  $("stop-button").disabled = true;
});

loadModel();
