// Trident console: a chat playground over /v1 and a live cluster view (/console/api/cluster).
// Plain browser JavaScript; the API key stays in this tab's sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;
let lastCluster = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error("GET /v1/models: HTTP " + r.status);
    const body = await r.json();
    const select = $("model");
    select.replaceChildren(...body.data.map((m) => el("option", "", m.id)));
    setStatus("connected");
  } catch (err) {
    setStatus(String(err.message || err), true);
  }
}

function requestBody(messages) {
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Reads an SSE body, calling onEvent(json) for each `data:` line until [DONE].
async function readEvents(response, onEvent) {
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
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function statsText(s) {
  const parts = [];
  if (s.ttft !== null) parts.push("TTFT " + (s.ttft * 1000).toFixed(0) + " ms");
  if (s.usage) {
    const n = s.usage.completion_tokens;
    const span = s.end - (s.first ?? s.end);
    parts.push(n + " tokens" + (span > 0 && n > 1 ? ", " + ((n - 1) / span).toFixed(1) + " tokens/s" : ""));
    const cached = (s.usage.prompt_tokens_details || {}).cached_tokens || 0;
    parts.push(s.usage.prompt_tokens + " prompt tokens, " + cached + " cached");
  }
  if (s.workers && s.workers.length) parts.push("served by " + s.workers.join(", "));
  if (s.finish) parts.push("finish: " + s.finish);
  return parts.join(" · ");
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || controller) return;
  $("chat-input").value = "";
  history.push({ role: "user", content: text });
  $("messages").append(el("div", "msg user", text));
  const answer = el("div", "msg assistant");
  const content = el("span", "content");
  const stats = el("span", "stats", "waiting for the first token...");
  answer.append(content, stats);
  $("messages").append(answer);
  $("messages").scrollTop = $("messages").scrollHeight;
  const messages = $("system").value.trim()
    ? [{ role: "system", content: $("system").value.trim() }, ...history]
    : history.slice();
  const s = { start: performance.now() / 1000, first: null, end: null, ttft: null, usage: null, workers: null, finish: null };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + r.status);
    }
    await readEvents(r, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const delta = (choice.delta && choice.delta.content) || "";
        if (delta) {
          const now = performance.now() / 1000;
          if (s.first === null) { s.first = now; s.ttft = now - s.start; }
          content.textContent += delta;
          answer.dataset.chunks = String(Number(answer.dataset.chunks || 0) + 1);
        }
        if (choice.finish_reason) s.finish = choice.finish_reason;
      }
      if (chunk.usage) s.usage = chunk.usage;
      if (chunk.trident) s.workers = chunk.trident.workers;
      s.end = performance.now() / 1000;
      stats.textContent = statsText(s);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
    answer.dataset.done = "true";
    history.push({ role: "assistant", content: content.textContent });
  } catch (err) {
    answer.classList.add("error");
    stats.textContent = err.name === "AbortError" ? "stopped" : String(err.message || err);
    answer.dataset.done = "error";
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function bar(used, total) {
  const outer = el("span", "bar");
  const inner = el("span");
  inner.style.width = (total > 0 ? Math.min(100, (100 * used) / total) : 0) + "%";
  outer.append(inner);
  return outer;
}

function recentTtft(w) {
  const before = lastCluster && lastCluster[w.name];
  if (before && w.ttft_count > before.ttft_count) {
    return (w.ttft_sum_s - before.ttft_sum_s) / (w.ttft_count - before.ttft_count);
  }
  return w.ttft_count > 0 ? w.ttft_sum_s / w.ttft_count : null;
}

function renderCluster(view) {
  const seen = {};
  const roles = $("cluster-roles");
  roles.replaceChildren();
  for (const [role, workers] of Object.entries(view.roles)) {
    roles.append(el("h3", "", role + " (" + workers.length + ")"));
    const table = el("table");
    const head = el("tr");
    for (const h of ["worker", "KV device", "KV tiers", "running", "waiting", "requests", "TTFT"]) head.append(el("th", "", h));
    table.append(head);
    for (const w of workers) {
      const row = el("tr", "worker-row" + (w.ready ? "" : " down"));
      row.dataset.worker = w.name;
      row.append(el("td", "", w.name + (w.ready ? "" : " (not ready)")));
      const kv = el("td");
      kv.append(bar(w.kv_used, w.kv_capacity), document.createTextNode(w.kv_used + "/" + w.kv_capacity));
      row.append(kv);
      const tiers = Object.entries(w.tiers).map(([m, n]) => m + " " + n).join(", ");
      row.append(el("td", "", tiers || "-"));
      row.append(el("td", "", String(w.running)), el("td", "", String(w.waiting)), el("td", "", String(w.requests)));
      const ttft = recentTtft(w);
      row.append(el("td", "", ttft === null ? "-" : (ttft * 1000).toFixed(0) + " ms"));
      table.append(row);
      seen[w.name] = w;
    }
    roles.append(table);
  }
  lastCluster = seen;
  const hits = Object.entries(view.hit_ratio).map(([pool, kinds]) =>
    pool + ": " + Object.entries(kinds).map(([k, v]) => k + " " + (100 * v).toFixed(0) + "%").join(", "));
  $("cluster-summary").textContent = (view.router_ready ? "router ready" : "router NOT ready") +
    (hits.length ? " · prefix hit ratio " + hits.join("; ") : "") + (view.error ? " · " + view.error : "");
  $("cluster-updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function pollCluster() {
  try {
    const r = await fetch("/console/api/cluster", { headers: headers() });
    if (!r.ok) throw new Error("cluster view: HTTP " + r.status);
    renderCluster(await r.json());
  } catch (err) {
    $("cluster-summary").textContent = String(err.message || err);
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem("trident-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("trident-api-key", $("api-key").value.trim());
    loadModels();
    pollCluster();
  });
  $("chat-form").addEventListener("submit", send);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });
  loadModels();
  pollCluster();
  setInterval(pollCluster, 2000);
}

init();
