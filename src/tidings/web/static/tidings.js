// Tidings browser client: subscribe to a Tidings (or any Mercure) hub over EventSource and
// lose nothing across drops, hub restarts, token refreshes and sleeping tabs.
// A plain ES module, no build step, no dependencies:
//
//   import { subscribe } from "/static/tidings.js";
//   const sub = subscribe({
//     topics: ["/books/{id}"],
//     onUpdate: ({ id, data }) => console.log(id, data),
//     onStatus: (status) => console.log(status),  // connecting, live, reconnecting, closed
//   });
//   sub.close();
//
// Documented in docs/clients.md.

/** The statuses `onStatus` reports, in the order a subscription can go through them. */
export const STATUSES = Object.freeze(["connecting", "live", "reconnecting", "closed"]);

const DEFAULTS = Object.freeze({
  hub: "/.well-known/mercure",
  selector: "topic",
  types: ["message"],
  initialDelayMs: 1000,
  maxDelayMs: 30000,
  dedupe: 1000,
  anchor: true,
});

/**
 * Subscribe to `topics` on `hub`; returns `{ close(), reconnect(), status, lastEventId }`.
 *
 * Options:
 *   hub              hub URL, absolute or relative to the page ("/.well-known/mercure")
 *   topics           a topic selector or an array of them (exact, URI template, "*")
 *   onUpdate(u)      called once per update, in order, with
 *                    { id, type, data, raw, isJson }: `raw` is the data string, `data` the
 *                    parsed JSON value when `raw` is JSON, else `raw` itself
 *   onStatus(s)      called on every status change: connecting, live, reconnecting, closed
 *   lastEventId      resume after this id ("earliest": all of the hub's history)
 *   withCredentials  send cookies to a hub on another origin (EventSource's option)
 *   authorization    a subscriber JWT, or a function (may be async) returning a fresh one,
 *                    read before every connection and sent as ?authorization=
 *                    (prefer a cookie: URLs end up in logs)
 *   types            event types to listen to (the updates' `type`), default ["message"]
 *   selector         query parameter for the topics: "topic" (default) or "match"
 *   initialDelayMs, maxDelayMs   reconnection backoff: the n-th delay in a row is uniform in
 *                    [0, min(maxDelayMs, initialDelayMs * 2^n)] (full jitter)
 *   dedupe           how many recent updates to remember to drop repeats (0: none)
 *   anchor           without lastEventId, first ask the hub (one HEAD request) for its newest
 *                    id, so that a drop before the first update still loses nothing
 */
export function subscribe(options = {}) {
  const o = { ...DEFAULTS, ...options };
  const topics = typeof o.topics === "string" ? [o.topics] : Array.from(o.topics ?? []);
  if (topics.length === 0) {
    throw new TypeError("subscribe: `topics` needs at least one topic selector");
  }
  if (typeof o.onUpdate !== "function") {
    throw new TypeError("subscribe: `onUpdate` must be a function");
  }
  const types = Array.from(o.types);
  const hubUrl = new URL(o.hub, globalThis.location?.href);
  const credentials = o.withCredentials ? "include" : "same-origin";
  const recent = new RecentUpdates(o.dedupe);
  const hasDocument = typeof document !== "undefined";
  const hasWindow = typeof window !== "undefined";

  let status = null;
  let lastId = o.lastEventId || null;
  let anchor = Boolean(o.anchor);
  let source = null; // the EventSource in use, if any
  let timer = null; // the pending reconnection, if any
  let failures = 0; // failed connections since the last one that opened
  let generation = 0; // bumped whenever a connection is abandoned: stale work checks it
  let closed = false;

  function setStatus(next) {
    if (next === status) return;
    status = next;
    if (o.onStatus) call(o.onStatus, next);
  }

  function url(token) {
    const u = new URL(hubUrl);
    for (const topic of topics) u.searchParams.append(o.selector, topic);
    if (lastId) u.searchParams.set("lastEventID", lastId);
    if (token) u.searchParams.set("authorization", token);
    return u;
  }

  // Open a new EventSource, resuming after the last id seen. Asynchronous (a token to fetch,
  // the HEAD of `anchor`): a close() or another open() in the meantime wins.
  async function open() {
    timer = null;
    if (closed) return;
    const mine = ++generation;
    try {
      const auth = o.authorization;
      const token = typeof auth === "function" ? await auth() : auth;
      if (mine !== generation) return;
      if (!lastId && anchor) {
        await findStart(token);
        if (mine !== generation) return;
      }
      const es = new EventSource(url(token), { withCredentials: Boolean(o.withCredentials) });
      source = es;
      es.onopen = () => {
        if (source !== es) return;
        failures = 0;
        setStatus("live");
      };
      // Every error is handled here, also those the browser would retry by itself
      // (readyState CONNECTING): its retry has a fixed delay, so a hub restart would bring
      // all of its clients back at the same instant.
      es.onerror = () => {
        if (source === es) retry();
      };
      for (const type of types) es.addEventListener(type, onMessage);
    } catch (err) {
      if (mine !== generation) return;
      report(err);
      retry();
    }
  }

  // The hub's Last-Event-ID response header is its newest id when it registered us.
  async function findStart(token) {
    let response;
    try {
      response = await fetch(url(token), { method: "HEAD", credentials, cache: "no-store" });
    } catch {
      return; // unreachable: the EventSource fails too and we come back here
    }
    const id = response.headers.get("Last-Event-ID");
    if (id) lastId = id;
    // A hub (or CORS setup) that does not tell: do not ask again. Refusals and failures
    // (401, 403, 429, 5xx) say nothing about that, so they are asked again next time.
    else if (response.ok || response.status === 404 || response.status === 405) anchor = false;
  }

  function onMessage(event) {
    if (event.target !== source) return;
    const id = event.lastEventId || null;
    if (id !== null) {
      if (!recent.add(id, event.type, event.data)) return; // a repeat
      lastId = id;
    }
    const raw = event.data;
    let data = raw;
    let isJson = false;
    try {
      data = JSON.parse(raw);
      isJson = true;
    } catch {
      // not JSON: `data` stays the string
    }
    call(o.onUpdate, { id, type: event.type, data, raw, isJson });
  }

  function drop() {
    generation++;
    if (timer !== null) clearTimeout(timer);
    timer = null;
    if (source !== null) {
      source.onopen = null;
      source.onerror = null;
      for (const type of types) source.removeEventListener(type, onMessage);
      source.close();
      source = null;
    }
  }

  function retry() {
    drop();
    if (closed) return;
    setStatus("reconnecting");
    const ceiling = Math.min(o.maxDelayMs, o.initialDelayMs * 2 ** Math.min(failures, 30));
    failures++;
    timer = setTimeout(open, Math.random() * ceiling);
  }

  function reopenNow() {
    if (closed) return;
    drop();
    setStatus(status === "connecting" ? "connecting" : "reconnecting");
    open();
  }

  // Back from the background: skip what is left of a backoff. Back online: the old
  // connection is probably dead even if the browser has not noticed yet.
  function onVisibility() {
    if (document.visibilityState === "visible" && timer !== null) reopenNow();
  }
  function onOnline() {
    reopenNow();
  }

  if (hasDocument) document.addEventListener("visibilitychange", onVisibility);
  if (hasWindow) window.addEventListener("online", onOnline);
  setStatus("connecting");
  open();

  return {
    /** Stop for good: closes the EventSource, cancels timers, removes every listener. */
    close() {
      if (closed) return;
      closed = true;
      drop();
      if (hasDocument) document.removeEventListener("visibilitychange", onVisibility);
      if (hasWindow) window.removeEventListener("online", onOnline);
      recent.clear();
      setStatus("closed");
    },
    /** Reconnect now, resuming after the last id (after a token refresh, say). */
    reconnect() {
      reopenNow();
    },
    get status() {
      return status;
    },
    get lastEventId() {
      return lastId;
    },
  };
}

/** The last `size` updates seen, by id plus a hash of type and data (bounded memory). */
export class RecentUpdates {
  constructor(size = DEFAULTS.dedupe) {
    this.size = size;
    this.keys = new Set(); // a Set iterates in insertion order: the first is the oldest
  }

  /** False if this update is in the window already; otherwise remembers it. */
  add(id, type, data) {
    if (!(this.size > 0)) return true;
    // An id reused for a different update (Mercure allows it) is not a repeat.
    const key = `${id}\n${type}\n${data.length}:${fnv1a(data)}`;
    if (this.keys.has(key)) return false;
    this.keys.add(key);
    if (this.keys.size > this.size) this.keys.delete(this.keys.values().next().value);
    return true;
  }

  clear() {
    this.keys.clear();
  }
}

function fnv1a(text) {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0).toString(36);
}

// A callback that throws must not break the subscription: report it like an uncaught error.
function call(callback, value) {
  try {
    callback(value);
  } catch (err) {
    report(err);
  }
}

function report(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => { throw err; });
}
