// Tidings status page and debugger. Remote and user text is only ever set via textContent.
const $ = (id) => document.getElementById(id);
const HUB = "/.well-known/mercure";
const MAX_ROWS = 500;
const TOKEN_KEY = "tidings.publisherToken";

// -- hub status ---------------------------------------------------------------------

function formatUptime(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m ${sec}s`;
  return m ? `${m}m ${sec}s` : `${sec}s`;
}

async function refreshStatus() {
  const status = $("status");
  try {
    const res = await fetch("/healthz", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const h = await res.json();
    $("st-status").textContent = String(h.status);
    $("st-version").textContent = String(h.version);
    $("st-subscribers").textContent = String(h.subscribers);
    $("st-last-seq").textContent = String(h.last_seq);
    $("st-uptime").textContent = formatUptime(Number(h.uptime_s) || 0);
    status.dataset.ok = h.status === "ok" ? "true" : "false";
  } catch (err) {
    $("st-status").textContent = `unreachable (${err.message})`;
    status.dataset.ok = "false";
  }
}

// -- event log ----------------------------------------------------------------------

function timeNow() {
  const d = new Date();
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function field(cls, label, value) {
  const span = document.createElement("span");
  span.className = cls;
  const b = document.createElement("b");
  b.textContent = label;
  span.append(b, " ", value);
  return span;
}

function addRow(id, type, data) {
  const log = $("log");
  const li = document.createElement("li");
  const meta = document.createElement("div");
  meta.className = "meta";
  const time = document.createElement("time");
  time.dateTime = new Date().toISOString();
  time.textContent = timeNow();
  meta.append(time, field("id", "id", id || "—"), field("type", "type", type));
  const pre = document.createElement("pre");
  pre.textContent = data;
  li.append(meta, pre);
  log.prepend(li);
  while (log.children.length > MAX_ROWS) log.lastElementChild.remove();
  $("log-count").textContent = `(${log.children.length})`;
}

$("log-clear").addEventListener("click", () => {
  $("log").replaceChildren();
  $("log-count").textContent = "(0)";
});

// -- subscribe ----------------------------------------------------------------------

let source = null;

function setState(state) {
  const badge = $("sub-state");
  badge.textContent = state;
  badge.dataset.state = state;
  $("sub-connect").textContent = state === "closed" ? "Connect" : "Disconnect";
}

function lines(text) {
  return text.split("\n").map((t) => t.trim()).filter(Boolean);
}

function subscribeUrl() {
  const url = new URL(HUB, location.origin);
  const kind = $("sub-kind").value;
  for (const topic of lines($("sub-topic").value)) url.searchParams.append(kind, topic);
  const lastId = $("sub-last-id").value.trim();
  if (lastId) url.searchParams.set("lastEventID", lastId);
  const token = $("sub-token").value.trim();
  if (token) url.searchParams.set("authorization", token);
  return url;
}

// EventSource hides the body of a failed response; ask once more to show the hub's reason.
async function explainFailure(url) {
  const ctrl = new AbortController();
  try {
    const res = await fetch(url, { signal: ctrl.signal, cache: "no-store" });
    if (!res.ok) {
      let msg = `HTTP ${res.status}`;
      try { msg = `${(await res.json()).error} (HTTP ${res.status})`; } catch { /* not JSON */ }
      $("sub-error").textContent = msg;
    } else {
      $("sub-error").textContent = "The stream closed.";
    }
  } catch { $("sub-error").textContent = "The hub is unreachable."; }
  finally { ctrl.abort(); }
}

function disconnect() {
  if (source) source.close();
  source = null;
  setState("closed");
}

function connect() {
  $("sub-error").textContent = "";
  if (lines($("sub-topic").value).length === 0) {
    $("sub-error").textContent = "Give at least one topic.";
    $("sub-topic").focus();
    return;
  }
  const url = subscribeUrl();
  const es = new EventSource(url);
  source = es;
  setState("connecting");
  es.onopen = () => { if (source === es) setState("live"); };
  es.onerror = () => {
    if (source !== es) return;
    if (es.readyState === EventSource.CLOSED) {
      source = null;
      setState("closed");
      explainFailure(url);
    } else {
      setState("reconnecting");
    }
  };
  const types = new Set(["message", ...$("sub-events").value.split(",").map((t) => t.trim()).filter(Boolean)]);
  for (const type of types) {
    es.addEventListener(type, (e) => { if (source === es) addRow(e.lastEventId, e.type, e.data); });
  }
}

$("sub-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (source) disconnect(); else connect();
});

// -- publish ------------------------------------------------------------------------

const pubToken = $("pub-token");
try { pubToken.value = localStorage.getItem(TOKEN_KEY) || ""; } catch { /* storage blocked */ }
pubToken.addEventListener("input", () => {
  try { localStorage.setItem(TOKEN_KEY, pubToken.value.trim()); } catch { /* storage blocked */ }
});

function showResult(text, ok) {
  const out = $("pub-result");
  out.textContent = text;
  out.dataset.ok = ok ? "true" : "false";
}

$("pub-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = new URLSearchParams();
  const topics = lines($("pub-topic").value);
  if (topics.length === 0) return showResult("Give at least one topic.", false);
  for (const topic of topics) body.append("topic", topic);
  body.append("data", $("pub-data").value);
  if ($("pub-private").checked) body.append("private", "on");
  for (const name of ["id", "type", "retry"]) {
    const value = $(`pub-${name}`).value.trim();
    if (value) body.append(name, value);
  }
  const send = $("pub-send");
  send.disabled = true;
  showResult("Publishing…", true);
  try {
    const res = await fetch(HUB, {
      method: "POST",
      headers: { Authorization: `Bearer ${pubToken.value.trim()}` },
      body,
    });
    const text = await res.text();
    if (res.ok) {
      showResult(`Published: ${text}`, true);
    } else {
      let msg = text;
      try { msg = JSON.parse(text).error; } catch { /* plain text */ }
      showResult(`Error ${res.status}: ${msg}`, false);
    }
  } catch (err) {
    showResult(`Network error: ${err.message}`, false);
  } finally {
    send.disabled = false;
  }
});

refreshStatus();
setInterval(refreshStatus, 5000);
