// Tidings chat: plain ES module, no build step. Data comes from the chat's JSON API; live
// updates come from the hub (/.well-known/mercure) through /static/tidings.js, which
// resumes after the last id it saw (drops, hub restarts) and drops repeats. Rendering is
// keyed by message id as well, so a message shows exactly once whatever arrives twice.
// All user text goes into the page with textContent, never as HTML.

import { subscribe } from "/static/tidings.js";

const $ = (id) => document.getElementById(id);
const TYPING_SHOW_MS = 4000;
const TYPING_SEND_MS = 1500;
const PAGE = 50;

const state = {
  me: null, // the /api/me answer
  rooms: new Map(), // name -> {name, joined, unread, last_id, members, online}
  people: new Map(), // username -> {username, unread, last_id, online}
  online: new Set(), // everyone online
  current: null, // {key, room, user}
  convs: new Map(), // key -> {messages: Map(id -> message), oldest, more, loaded, loading}
  typing: new Map(), // key -> Map(user -> until)
  tasks: new Map(), // id -> {percent, step, state, download, error}
  stream: null,
  topicsKey: "",
  ready: false,
  pending: [],
  lastStatus: null,
  resubscribing: false,
};

// -- small helpers -------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const init = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text };
  }
  if (!response.ok) {
    if (response.status === 401 && !path.startsWith("/api/auth/")) showAuth();
    const error = new ApiError(response.status, data);
    error.retryAfter = response.headers.get("Retry-After");
    throw error;
  }
  return data;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value != null) node.setAttribute(name, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const dmKey = (a, b) => "dm:" + [a, b].sort().join(":");
const roomKey = (name) => "room:" + name;

function keyOf(fields) {
  // {room, dm} of an update or a message -> the conversation key
  if (fields.room) return roomKey(fields.room);
  if (fields.dm) return dmKey(fields.dm[0], fields.dm[1]);
  return null;
}

function otherOf(dm) {
  return dm[0] === state.me.username ? dm[1] : dm[0];
}

function convPath(conv) {
  return conv.room
    ? `/api/rooms/${encodeURIComponent(conv.room)}`
    : `/api/dm/${encodeURIComponent(conv.user)}`;
}

function timeOf(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime())
    ? iso
    : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function toast(text, kind = "info", title = null) {
  const node = el("div", { class: `toast ${kind}` },
    title ? el("strong", { text: title }) : null, el("span", { text }));
  $("toasts").append(node);
  setTimeout(() => node.remove(), 6000);
}

// -- signing in ----------------------------------------------------------------------------

function showAuth() {
  if (state.stream) state.stream.close();
  state.stream = null;
  state.ready = false;
  state.tasks.clear();
  state.typing.clear();
  renderTasks();
  $("chat").hidden = true;
  $("account").hidden = true;
  $("auth").hidden = false;
  setStatus("closed", "signed out");
  $("username").focus();
}

$("auth-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter?.value === "signup" ? "signup" : "login";
  $("auth-error").textContent = "";
  try {
    await api("POST", `/api/auth/${action}`, {
      username: $("username").value,
      password: $("password").value,
    });
    $("password").value = "";
    await start();
  } catch (error) {
    $("auth-error").textContent = error.message;
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await api("POST", "/api/auth/logout");
  } finally {
    state.me = null;
    showAuth();
  }
});

$("menu").addEventListener("click", () => {
  const open = document.body.classList.toggle("show-sidebar");
  $("menu").setAttribute("aria-expanded", String(open));
});

// -- the stream ----------------------------------------------------------------------------

function setStatus(status, label = status) {
  const badge = $("status");
  badge.dataset.state = status;
  badge.textContent = label;
  document.body.dataset.stream = status;
}

let lastSessionCheck = 0;

function onStatus(status) {
  if (status === "closed" && state.resubscribing) return;
  state.lastStatus = status;
  setStatus(status);
  if (status === "reconnecting" && Date.now() - lastSessionCheck > 10000) {
    // A long outage may outlive the session: refresh the cookie (or go to sign-in).
    lastSessionCheck = Date.now();
    api("GET", "/api/me").catch(() => {});
  }
  if (status === "live" && state.ready && state.current) refreshPresence();
}

function streamTopics() {
  const joined = [...state.rooms.values()].filter((r) => r.joined).map((r) => r.name).sort();
  return [...state.me.subscribe, ...joined.map((name) => `/chat/rooms/${name}`)];
}

// (Re)subscribe when the set of topics changes, resuming after the last id seen (the
// first time: after `resumeAfter`, a history page's last_event_id, when there is one).
function ensureStream(resumeAfter) {
  const topics = streamTopics();
  const key = topics.join(" ");
  if (state.stream && key === state.topicsKey) return;
  const lastEventId = state.stream ? state.stream.lastEventId : resumeAfter;
  if (state.stream) {
    state.resubscribing = true;
    state.stream.close();
    state.resubscribing = false;
  }
  state.topicsKey = key;
  state.stream = subscribe({
    topics,
    lastEventId,
    onUpdate: ({ data, isJson }) => {
      if (!isJson || typeof data !== "object" || data === null) return;
      if (state.ready) apply(data);
      else state.pending.push(data);
    },
    onStatus,
    maxDelayMs: 5000,
  });
}

function whenLive(timeoutMs) {
  return new Promise((resolve) => {
    const started = Date.now();
    const check = () => {
      if (state.lastStatus === "live" || Date.now() - started > timeoutMs) resolve();
      else setTimeout(check, 25);
    };
    check();
  });
}

// -- starting ------------------------------------------------------------------------------

async function start() {
  // /api/session answers 200 signed in or not: no 401 in a signed-out visitor's console.
  const session = await api("GET", "/api/session");
  if (!session.user) {
    showAuth();
    return;
  }
  state.me = session.user;
  state.ready = false;
  state.pending = [];
  state.convs.clear();
  $("auth").hidden = true;
  $("chat").hidden = false;
  $("account").hidden = false;
  $("me").textContent = state.me.username;
  const target = parseHash() ?? { room: "general" };
  // The first conversation's history carries the id of the last update it reflects, and
  // the stream starts right after it: nothing in between is missed, nothing it has comes
  // again (an assistant reply mid-stream included). The lists are read after it, so they
  // are at least as new; the updates they already reflect change nothing when they come.
  const first = await firstPage(target);
  await loadLists(); // the joined rooms decide the topics
  ensureStream(first ?? undefined);
  if (first === null) {
    // No resume point (the target does not exist): read the lists once the hub has
    // registered the subscription (or its position is anchored), so anything after them
    // arrives on the stream; overlaps are deduplicated.
    await whenLive(3000);
    await loadLists();
  }
  state.ready = true;
  const pending = state.pending;
  state.pending = [];
  for (const update of pending) apply(update);
  ensureStream();
  await open(target);
}

// Load the newest page of `target` (a room or a person) into its conversation; returns
// the page's last_event_id, or null when it cannot be read.
async function firstPage(target) {
  const key = target.room ? roomKey(target.room) : dmKey(state.me.username, target.user);
  if (target.user === state.me.username) return null;
  try {
    const page = await api("GET", `${convPath(target)}/messages?limit=${PAGE}`);
    addPage(conv(key), page);
    return page.last_event_id ?? null;
  } catch {
    return null; // open() shows what is wrong and where it goes instead
  }
}

async function loadLists() {
  const [rooms, dms, users] = await Promise.all([
    api("GET", "/api/rooms"), api("GET", "/api/dm"), api("GET", "/api/users"),
  ]);
  state.rooms = new Map(rooms.rooms.map((room) => [room.name, room]));
  state.online = new Set(users.users.filter((u) => u.online).map((u) => u.username));
  const people = new Map();
  for (const user of users.users) {
    if (user.username === state.me.username) continue;
    people.set(user.username, { username: user.username, unread: 0, last_id: 0 });
  }
  for (const conv of dms.conversations) {
    const person = people.get(conv.user);
    if (person) Object.assign(person, { unread: conv.unread, last_id: conv.last_id });
  }
  state.people = people;
  renderSidebar();
}

function parseHash() {
  const [kind, name] = decodeURIComponent(location.hash.slice(1)).split("/");
  if (kind === "room" && name) return { room: name };
  if (kind === "dm" && name) return { user: name };
  return null;
}

// -- the sidebar ---------------------------------------------------------------------------

function renderSidebar() {
  const rooms = [...state.rooms.values()].sort(
    (a, b) => (b.joined - a.joined) || a.name.localeCompare(b.name));
  $("rooms").replaceChildren(...rooms.map((room) => {
    const key = roomKey(room.name);
    const button = el("button", {
      type: "button",
      "data-room": room.name,
      "aria-current": state.current?.key === key ? "true" : "false",
      "aria-label": `#${room.name}${room.joined ? "" : " (not joined)"}` +
        (room.unread ? `, ${room.unread} unread` : ""),
      onclick: () => open({ room: room.name }),
    },
    el("span", { class: "name", text: `# ${room.name}` }),
    room.unread ? el("span", { class: "unread", text: String(room.unread) }) : null);
    return el("li", { class: room.joined ? "" : "not-joined" }, button);
  }));
  const people = [...state.people.values()].sort(
    (a, b) => (b.last_id - a.last_id) || a.username.localeCompare(b.username));
  $("people").replaceChildren(...people.map((person) => {
    const key = dmKey(state.me.username, person.username);
    const online = state.online.has(person.username);
    return el("li", {}, el("button", {
      type: "button",
      "data-user": person.username,
      "aria-current": state.current?.key === key ? "true" : "false",
      "aria-label": `${person.username}, ${online ? "online" : "offline"}` +
        (person.unread ? `, ${person.unread} unread` : ""),
      onclick: () => open({ user: person.username }),
    },
    el("span", { class: online ? "dot on" : "dot", "aria-hidden": "true" }),
    el("span", { class: "name", text: person.username }),
    person.unread ? el("span", { class: "unread", text: String(person.unread) }) : null));
  }));
}

$("new-room").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("new-room-error").textContent = "";
  try {
    const room = await api("POST", "/api/rooms", { name: $("new-room-name").value });
    $("new-room-name").value = "";
    state.rooms.set(room.name, room);
    ensureStream();
    await open({ room: room.name });
  } catch (error) {
    $("new-room-error").textContent = error.message;
  }
});

// -- a conversation ------------------------------------------------------------------------

function conv(key) {
  let entry = state.convs.get(key);
  if (!entry) {
    entry = { messages: new Map(), oldest: null, more: true, loaded: false, loading: false };
    state.convs.set(key, entry);
  }
  return entry;
}

async function open(target) {
  document.body.classList.remove("show-sidebar");
  $("menu").setAttribute("aria-expanded", "false");
  let current;
  if (target.room) {
    let room = state.rooms.get(target.room);
    if (!room) {
      toast(`There is no room #${target.room}`, "warning");
      target = { room: "general" };
      room = state.rooms.get("general");
      if (!room) return;
    }
    current = { key: roomKey(room.name), room: room.name, user: null };
    history.replaceState(null, "", `#room/${room.name}`);
  } else {
    if (target.user === state.me.username || !state.people.has(target.user)) {
      target = { room: "general" };
      return open(target);
    }
    current = { key: dmKey(state.me.username, target.user), room: null, user: target.user };
    history.replaceState(null, "", `#dm/${target.user}`);
  }
  state.current = current;
  const joined = current.room ? state.rooms.get(current.room).joined : true;
  $("conv-title").textContent = current.room ? `# ${current.room}` : `@ ${current.user}`;
  $("composer-label").textContent = current.room
    ? `Message #${current.room}` : `Message ${current.user}`;
  $("leave").hidden = !current.room || !joined || current.room === "general";
  // A visitor of a room sees its messages and one thing to do: join it.
  $("export").hidden = !current.room || !joined;
  $("export-format").hidden = !current.room || !joined;
  $("composer").hidden = !joined;
  $("composer-hint").hidden = !joined;
  $("send").hidden = !joined;
  $("join").hidden = joined;
  $("composer-error").textContent = "";
  renderSidebar();
  renderMessages(true);
  renderTyping();
  refreshPresence();
  const entry = conv(current.key);
  if (!entry.loaded) await loadOlder(current.key);
  markRead();
  if (joined) $("composer").focus();
}

async function loadOlder(key) {
  const entry = conv(key);
  if (entry.loading || (entry.loaded && !entry.more)) return;
  entry.loading = true;
  const target = state.current;
  $("older").textContent = "Loading…";
  try {
    const parsed = key.startsWith("room:")
      ? { room: key.slice(5) } : { user: otherOf(key.slice(3).split(":")) };
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (entry.oldest !== null) params.set("before", String(entry.oldest));
    const page = await api("GET", `${convPath(parsed)}/messages?${params}`);
    addPage(entry, page);
    if (state.current === target) renderMessages(false, true);
  } catch (error) {
    if (error.status !== 401) toast(error.message, "error", "Could not load messages");
  } finally {
    entry.loading = false;
    $("older").textContent = entry.more ? "" : "Beginning of the conversation";
  }
}

function addPage(entry, page) {
  for (const message of page.messages) {
    if (!entry.messages.has(message.id) && !entry.deleted?.has(message.id)) {
      entry.messages.set(message.id, message);
    } else if (message.assistant) {
      mergeReply(entry, message); // a streaming reply: keep whichever is further along
    }
    if (entry.oldest === null || message.id < entry.oldest) entry.oldest = message.id;
  }
  entry.more = page.next_before !== null;
  entry.loaded = true;
}

function messageNode(message) {
  const mine = message.sender === state.me.username;
  const mentioned = !mine && new RegExp(`(^|[^A-Za-z0-9_])@${state.me.username}(?![A-Za-z0-9_])`, "i")
    .test(message.content);
  const actions = mine
    ? el("span", { class: "actions" },
      el("button", { type: "button", class: "link", text: "Edit",
        "aria-label": `Edit message ${message.id}`, onclick: () => startEdit(message.id) }),
      el("button", { type: "button", class: "link", text: "Delete",
        "aria-label": `Delete message ${message.id}`, onclick: () => remove(message.id) }))
    : null;
  const reply = message.assistant;
  return el("li", {
    class: `msg${mine ? " mine" : ""}${mentioned ? " mention" : ""}${reply ? " assistant" : ""}`,
    "data-id": message.id,
    "data-state": reply ? reply.state : null,
  },
  el("div", { class: "meta" },
    el("span", { class: "sender", text: message.sender }),
    el("time", { datetime: message.created_at, text: timeOf(message.created_at) }),
    message.edited_at ? el("span", { class: "edited", text: "(edited)" }) : null,
    reply ? replyStatus(message) : null,
    actions),
  el("p", { class: "content", text: message.content }),
  reply?.note ? el("p", { class: reply.state === "failed" ? "note error" : "note",
    text: reply.note }) : null);
}

// -- the assistant's replies ---------------------------------------------------------------
// A reply arrives as message.created (empty, state "streaming"), message.delta updates
// ({offset, text}: text at that offset, in code points), then message.completed (the
// stored message). A delta repeats nothing: one that overlaps what the page has (a
// snapshot loaded mid-reply, a replay after a reconnect) adds only the rest.

const codePoints = (text) => Array.from(text);

function replyStatus(message) {
  const reply = message.assistant;
  if (reply.state !== "streaming") {
    const labels = { cancelled: "(stopped)", failed: "(failed)", unavailable: "" };
    return labels[reply.state] ? el("span", { class: "edited", text: labels[reply.state] }) : null;
  }
  const stop = reply.asker === state.me.username && message.room
    ? el("button", { type: "button", class: "link", text: "Stop",
      "aria-label": `Stop the assistant's reply ${message.id}`,
      onclick: () => stopReply(message) })
    : null;
  return el("span", { class: "actions" },
    el("span", { class: "streaming", text: "writing…" }), stop);
}

async function stopReply(message) {
  try {
    const ended = await api("POST",
      `/api/rooms/${encodeURIComponent(message.room)}/assistant/${message.id}/cancel`);
    setReply(ended);
  } catch (error) {
    toast(error.message, "error");
  }
}

// Keep the version of a reply that is further along: an ended one, else the longer one.
function mergeReply(entry, message) {
  const known = entry.messages.get(message.id);
  if (known?.assistant && known.assistant.state !== "streaming") return false;
  if (known && message.assistant?.state === "streaming" &&
      codePoints(known.content).length >= codePoints(message.content).length) return false;
  entry.messages.set(message.id, message);
  return true;
}

function setReply(message) {
  const key = keyOf(message);
  if (!key) return;
  const entry = conv(key);
  if (!entry.messages.has(message.id) && !entry.loaded) return;
  if (mergeReply(entry, message) && state.current?.key === key) renderMessages();
}

function applyDelta(update) {
  const key = keyOf(update.message);
  if (!key) return;
  const entry = conv(key);
  const message = entry.messages.get(update.message.id);
  if (!message || message.assistant?.state !== "streaming") return; // history brings it
  const have = codePoints(message.content).length;
  if (update.offset > have) { // a gap (should not happen): fetch the stored text
    refetch(key, update.message);
    return;
  }
  const fresh = codePoints(update.text).slice(have - update.offset).join("");
  if (!fresh) return;
  const grown = { ...message, content: message.content + fresh };
  entry.messages.set(message.id, grown);
  if (state.current?.key !== key) return;
  const scroller = $("scroller");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const node = $("messages").querySelector(`li[data-id="${message.id}"] .content`);
  if (node) node.textContent = grown.content;
  else renderMessages();
  if (atBottom) scroller.scrollTop = scroller.scrollHeight;
}

async function refetch(key, ref) {
  const path = ref.room ? `/api/rooms/${encodeURIComponent(ref.room)}`
    : `/api/dm/${encodeURIComponent(otherOf(ref.dm))}`;
  try {
    const page = await api("GET", `${path}/messages?before=${ref.id + 1}&limit=1`);
    const message = page.messages.find((m) => m.id === ref.id);
    if (message && mergeReply(conv(key), message) && state.current?.key === key) {
      renderMessages();
    }
  } catch {
    // message.completed will carry the whole text
  }
}

// Full render of the current conversation (few hundred nodes at most), keeping the
// reader where they were: at the bottom if they were there, else on the same message.
function renderMessages(toBottom = false, keepOffset = false) {
  const scroller = $("scroller");
  const list = $("messages");
  if (!state.current) return;
  const entry = conv(state.current.key);
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  const sorted = [...entry.messages.values()].sort((a, b) => a.id - b.id);
  list.replaceChildren(...sorted.map(messageNode));
  if (toBottom || (atBottom && !keepOffset)) scroller.scrollTop = scroller.scrollHeight;
  else if (keepOffset) scroller.scrollTop = scroller.scrollHeight - fromBottom;
  $("older").textContent = entry.loaded && !entry.more ? "Beginning of the conversation" : "";
}

// Infinite scroll up: near the top, load the page before the oldest message shown.
// A reader at the bottom stays there when the list's box shrinks (a phone's address bar
// or keyboard coming up, the header wrapping, a task bar appearing): scrollTop alone
// would leave the newest messages below the visible area.
let readerAtBottom = true;
$("scroller").addEventListener("scroll", () => {
  const scroller = $("scroller");
  readerAtBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  if (scroller.scrollTop < 80 && state.current) loadOlder(state.current.key);
});
new ResizeObserver(() => {
  if (readerAtBottom) $("scroller").scrollTop = $("scroller").scrollHeight;
}).observe($("scroller"));

function startEdit(id) {
  const entry = conv(state.current.key);
  const message = entry.messages.get(id);
  const node = $("messages").querySelector(`li[data-id="${id}"]`);
  if (!message || !node) return;
  const area = el("textarea", { rows: "2", "aria-label": "Edit the message", maxlength: "4000" });
  area.value = message.content;
  const error = el("span", { class: "error", role: "alert" });
  const save = async () => {
    try {
      await api("PATCH", `/api/messages/${id}`, { content: area.value });
    } catch (err) {
      error.textContent = err.message;
      return;
    }
    renderMessages();
  };
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      save();
    } else if (event.key === "Escape") renderMessages();
  });
  node.querySelector(".content").replaceWith(el("div", {}, area,
    el("button", { type: "button", text: "Save", onclick: save }), " ",
    el("button", { type: "button", class: "secondary", text: "Cancel",
      onclick: () => renderMessages() }), error));
  area.focus();
  // The last message's editor is taller than the message was: bring all of it in view.
  node.scrollIntoView({ block: "nearest" });
}

async function remove(id) {
  if (!confirm("Delete this message?")) return;
  try {
    await api("DELETE", `/api/messages/${id}`);
  } catch (error) {
    toast(error.message, "error");
  }
}

// -- composing -----------------------------------------------------------------------------

let lastTypingSent = 0;

$("composer").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer-form").requestSubmit();
  }
});

$("composer").addEventListener("input", () => {
  const current = state.current;
  if (!current || !$("composer").value.trim()) return;
  if (Date.now() - lastTypingSent < TYPING_SEND_MS) return;
  lastTypingSent = Date.now();
  api("POST", `${convPath(current)}/typing`).catch(() => {});
});

$("composer-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const current = state.current;
  const content = $("composer").value;
  if (!current) return;
  $("composer-error").textContent = "";
  if (!content.trim()) {
    $("composer-error").textContent = "A message cannot be empty.";
    return;
  }
  $("send").disabled = true;
  try {
    const message = await api("POST", `${convPath(current)}/messages`, { content });
    $("composer").value = "";
    lastTypingSent = 0;
    addMessage(message); // the stream brings it too; rendering is keyed by id
  } catch (error) {
    $("composer-error").textContent = error.status === 429
      ? `Slow down: ${error.message}` : error.message;
  } finally {
    $("send").disabled = false;
    $("composer").focus();
  }
});

// Join or leave the open room, then open `next(room)`: the room itself, or #general.
async function changeMembership(action, next) {
  const current = state.current;
  if (!current?.room) return;
  try {
    const room = await api("POST", `/api/rooms/${encodeURIComponent(current.room)}/${action}`);
    state.rooms.set(room.name, { ...state.rooms.get(room.name), ...room });
    ensureStream();
    await open({ room: next(room) });
  } catch (error) {
    toast(error.message, "error");
  }
}

$("join").addEventListener("click", () => changeMembership("join", (room) => room.name));
$("leave").addEventListener("click", () => changeMembership("leave", () => "general"));

// -- exports (long tasks) ------------------------------------------------------------------

$("export").addEventListener("click", async () => {
  const current = state.current;
  if (!current?.room) return;
  try {
    const task = await api("POST", `/api/rooms/${encodeURIComponent(current.room)}/export`,
      { format: $("export-format").value });
    taskUpdate(task.task, { ...task, label: `#${current.room} (${task.format})` });
  } catch (error) {
    toast(error.message, "error", "Export");
  }
});

function taskUpdate(id, fields) {
  const task = { percent: 0, step: "", state: "queued", ...state.tasks.get(id) };
  for (const [name, value] of Object.entries(fields)) {
    // Updates may arrive before the 202 (or twice): progress never goes back.
    if (name === "percent" && value < task.percent) continue;
    if (name === "state" && (task.state === "completed" || task.state === "failed")) continue;
    task[name] = value;
  }
  state.tasks.set(id, task);
  renderTasks();
}

function renderTasks() {
  $("tasks").replaceChildren(...[...state.tasks.entries()].map(([id, task]) => {
    const label = `Export ${task.label ?? ""}`.trim();
    const progress = task.state === "failed" ? `failed: ${task.error ?? ""}`
      : task.state === "completed" ? "done" : `${task.percent}% ${task.step}`.trim();
    const parts = [
      el("span", { text: label }),
      el("progress", { max: "100", value: String(task.percent), "aria-label": `${label} progress` }),
      el("span", { class: "hint", text: progress }),
    ];
    if (task.state === "completed" && task.download) {
      parts.push(el("a", { href: task.download, download: "", text: "Download" }));
      if (task.format === "csv") {
        parts.push(el("span", { class: "hint csv-note", text: "(=, +, - and @ cells start with ')",
          title: "Spreadsheets run cells that start with = + - or @ as formulas (CSV " +
            "injection): such cells get a leading ' so that they show as text. The JSON " +
            "export keeps every message as written." }));
      }
    }
    parts.push(el("button", { type: "button", class: "link", text: "Dismiss",
      onclick: () => { state.tasks.delete(id); renderTasks(); } }));
    return el("div", { class: "task", "data-task": id, "data-state": task.state }, ...parts);
  }));
}

// -- applying live updates -----------------------------------------------------------------

function addMessage(message) {
  const key = keyOf(message);
  if (!key) return;
  const entry = conv(key);
  if (entry.deleted?.has(message.id)) return;
  const known = entry.messages.get(message.id);
  if (known && (known.edited_at || "") >= (message.edited_at || "")) return;
  if (!entry.loaded && !(state.current?.key === key)) return;
  entry.messages.set(message.id, message);
  if (state.current?.key === key) renderMessages();
}

function counterFor(key, message) {
  if (message.room) return state.rooms.get(message.room);
  const other = otherOf(message.dm);
  let person = state.people.get(other);
  if (!person && other !== state.me.username) {
    person = { username: other, unread: 0, last_id: 0 };
    state.people.set(other, person);
  }
  return person;
}

function apply(update) {
  switch (update.type) {
    case "message.created": {
      const message = update.message;
      const key = keyOf(message);
      const counter = counterFor(key, message);
      addMessage(message);
      if (counter && message.id > (counter.last_id ?? 0)) {
        counter.last_id = message.id;
        const mine = message.sender === state.me.username;
        const viewing = state.current?.key === key && document.visibilityState === "visible";
        if (!mine && (counter.joined ?? true)) {
          if (viewing) markRead();
          else {
            counter.unread = (counter.unread ?? 0) + 1;
            if (message.dm) toast(message.content.slice(0, 140), "info", `From ${message.sender}`);
          }
        }
        clearTyping(key, message.sender);
        renderSidebar();
      }
      break;
    }
    case "message.updated":
      addMessage(update.message);
      break;
    case "message.delta":
      applyDelta(update);
      break;
    case "message.completed":
      setReply(update.message);
      break;
    case "message.deleted": {
      const key = keyOf(update.message);
      const entry = conv(key);
      entry.deleted = entry.deleted ?? new Set();
      entry.deleted.add(update.message.id);
      if (entry.messages.delete(update.message.id) && state.current?.key === key) {
        renderMessages();
      }
      break;
    }
    case "typing":
      onTyping(update);
      break;
    case "presence":
      if (update.room === null) {
        state.online = new Set(update.online);
        renderSidebar();
      } else if (state.rooms.has(update.room)) {
        state.rooms.get(update.room).online = update.online;
        if (state.current?.room === update.room) renderPresence();
      }
      break;
    case "member.joined":
      // Everyone joins #general on sign-up: that is how new people appear in the list.
      if (update.user !== state.me.username && !state.people.has(update.user)) {
        state.people.set(update.user, { username: update.user, unread: 0, last_id: 0 });
        renderSidebar();
      }
      break;
    case "room.created":
      if (!state.rooms.has(update.room.name)) {
        state.rooms.set(update.room.name, { ...update.room, joined: update.room.created_by ===
          state.me.username, unread: 0, last_id: 0, members: 1, online: [] });
        renderSidebar();
      }
      break;
    case "read": {
      const key = keyOf(update);
      const counter = update.room ? state.rooms.get(update.room)
        : state.people.get(otherOf(update.dm));
      if (counter && update.last_read >= (counter.last_id ?? 0) && counter.unread) {
        counter.unread = 0;
        renderSidebar();
      }
      if (key && key === state.current?.key) renderSidebar();
      break;
    }
    case "notification":
      toast(update.message, update.kind === "warning" || update.kind === "error"
        ? "warning" : "info", update.kind === "mention" ? "Mention" : update.kind);
      break;
    case "task.progress":
    case "task.completed":
    case "task.failed":
      taskUpdate(update.task, {
        percent: update.percent, step: update.step, state: update.state,
        download: update.download, error: update.error,
      });
      break;
    default:
      break;
  }
}

// -- typing, presence, read markers --------------------------------------------------------

function onTyping(update) {
  if (update.user === state.me.username) return;
  // Typing is ephemeral: one replayed after a reconnect is old news.
  if (typeof update.at === "number" && Math.abs(Date.now() - update.at) > 10000) return;
  const key = keyOf(update);
  if (!key) return;
  const users = state.typing.get(key) ?? new Map();
  users.set(update.user, Date.now() + TYPING_SHOW_MS);
  state.typing.set(key, users);
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOW_MS + 50);
}

function clearTyping(key, user) {
  state.typing.get(key)?.delete(user);
  renderTyping();
}

function renderTyping() {
  const key = state.current?.key;
  const users = [...(state.typing.get(key)?.entries() ?? [])]
    .filter(([, until]) => until > Date.now()).map(([user]) => user);
  $("typing").textContent = users.length === 0 ? ""
    : users.length === 1 ? `${users[0]} is typing…` : `${users.join(", ")} are typing…`;
}

async function refreshPresence() {
  const current = state.current;
  if (!current) return;
  if (current.room) {
    try {
      const presence = await api("GET", `/api/rooms/${encodeURIComponent(current.room)}/presence`);
      const room = state.rooms.get(current.room);
      if (room) room.online = presence.online;
    } catch {
      // the stream's presence updates will do
    }
  }
  renderPresence();
}

function renderPresence() {
  const current = state.current;
  let online = [];
  if (current?.room) online = state.rooms.get(current.room)?.online ?? [];
  else if (current?.user) {
    online = [state.me.username, current.user].filter((u) => state.online.has(u));
  }
  $("presence").replaceChildren(...online.map((user) =>
    el("li", { text: user === state.me.username ? `${user} (you)` : user })));
}

let readTimer = null;

function markRead() {
  const current = state.current;
  if (!current || document.visibilityState !== "visible") return;
  const counter = current.room ? state.rooms.get(current.room) : state.people.get(current.user);
  if (current.room && !counter?.joined) return;
  if (counter) {
    counter.unread = 0;
    renderSidebar();
  }
  clearTimeout(readTimer);
  readTimer = setTimeout(() => {
    api("POST", `${convPath(current)}/read`, {}).catch(() => {});
  }, 250);
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") markRead();
});

// -- go ------------------------------------------------------------------------------------

(async () => {
  try {
    await start();
  } catch (error) {
    if (error.status !== 401) {
      setStatus("closed", "error");
      toast(error.message, "error", "Could not start");
    }
    showAuth();
  }
})();
