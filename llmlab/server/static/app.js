/**
 * The llmlab web chat: plain JavaScript for static/index.html, no build step and no dependencies.
 *
 * Everything the page shows is drawn from `state`: `renderThread()` redraws the messages of the open
 * conversation, `updateMessage()` redraws one of them (after a rating or a flag). While an answer streams in,
 * each delta is appended to its bubble directly, so a token costs one text node, not a redraw.
 *
 * Model and user text reaches the DOM only as text (textContent, text nodes): never through innerHTML,
 * so an answer containing markup is shown, not run.
 *
 * The server API is described in llmlab/server/app.py. Replies come back as Server-Sent Events from a POST,
 * which EventSource cannot send, so they are read with fetch and a stream reader (`readEvents`).
 *
 * Compare mode shows two answers side by side. When answer B comes out the same as answer A, the server samples
 * B again (see llmlab/server/ui_api.py): a `retry` event starts B's bubble over, and the comparison's `note`
 * (from the `done` event, or `compare_note` on reload) says so above the answers, or says plainly that the two
 * answers are the same when every try gave the same text.
 *
 * `window.llmlab.streamLog` records, for the reply streaming now, the length of the answer's text after each
 * delta ({choice, length}); the browser test reads it to check that answers render token by token.
 */

// Icons are constant SVG markup of our own (no user text), so innerHTML is safe for them.
const ICON_PATHS = {
  plus: "M12 5v14M5 12h14",
  menu: "M4 7h16M4 12h16M4 17h16",
  send: "M5 12h13M12 6l6 6-6 6",
  close: "M6 6l12 12M18 6 6 18",
  thumb: "M7 11v9H4v-9h3Zm0 0 4-7.5c1.4 0 2.5 1.1 2.5 2.5v3h5a2 2 0 0 1 2 2.3l-1.2 7A2 2 0 0 1 17.3 20H7",
  flag: "M5 21V4m0 0h12l-2.5 4.5L17 13H5",
  regenerate: "M19.5 12a7.5 7.5 0 1 1-2.2-5.3M19.5 4v5h-5",
  edit: "M4 20h4L19 9l-4-4L4 16v4Zm9-13 4 4",
  trash: "M5 7h14M10 7V5h4v2m-7 0 1 13h8l1-13",
};

function icon(name, extraClass = "") {
  const span = document.createElement("span");
  span.className = `icon ${extraClass}`.trim();
  span.setAttribute("aria-hidden", "true");
  span.innerHTML = `<svg viewBox="0 0 24 24" width="18" height="18" fill="none" stroke="currentColor"
    stroke-width="1.8" stroke-linecap="round" stroke-linejoin="round"><path d="${ICON_PATHS[name]}"/></svg>`;
  return span;
}

/** Build an element: string children become text nodes; attributes starting with "on" become listeners. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

const saved = {
  get(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch {
      // private mode or full storage: settings then last for this page only
    }
  },
};

const state = {
  conversations: [],
  conversation: null, // the open conversation (without its messages); null for a chat not yet started
  items: [], // the thread: {kind: "message", msg} or {kind: "compare", comparisonId, msgs: [a, b], note}
  busy: false, // a reply is streaming
  // the settings the user has changed; the sampling settings left unset are the server's (GET api/defaults, the
  // one place they are defined): the inputs show them, and a reply that does not send them gets them
  settings: { system: "", ...saved.get("llmlab.settings", {}) },
  defaults: {}, // the server's sampling defaults, once loaded
  apiKey: saved.get("llmlab.apiKey", ""),
  compare: saved.get("llmlab.compare", false),
  assistant: saved.get("llmlab.assistant", ""), // the custom assistant that answers ("" = the model itself)
  assistants: [], // GET api/assistants
};

const messageEls = new Map(); // message object -> its <article>, for streaming and single-message redraws

window.llmlab = { streamLog: [] };

// ---------------------------------------------------------------------------------------------------------
// Talking to the server

class ApiError extends Error {
  constructor(message, type = "error", status = 0) {
    super(message);
    this.type = type;
    this.status = status;
  }
}

function requestHeaders(hasBody) {
  const headers = {};
  if (hasBody) headers["Content-Type"] = "application/json";
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  return headers;
}

/** The error of a non-2xx response: our `{"error": {...}}` shape, FastAPI's `{"detail"}`, or the status line. */
async function errorFromResponse(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  let type = "http_error";
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      type = body.error.type || type;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(message, type, res.status);
}

async function request(method, path, body) {
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: requestHeaders(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(`Cannot reach the server (${err.message}).`, "network_error");
  }
  if (!res.ok) throw await errorFromResponse(res);
  return res.json();
}

/** Yield the JSON events of a `text/event-stream` body until `data: [DONE]` or the end of the body. */
async function* readEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue; // a comment or keep-alive
      if (data === "[DONE]") {
        reader.cancel().catch(() => {});
        return;
      }
      yield JSON.parse(data);
    }
  }
}

/** The sampling settings the user has set; the server fills in its defaults for the others. */
function samplingSettings() {
  const s = state.settings;
  const out = {};
  for (const key of ["temperature", "top_p"]) {
    if (s[key] !== undefined && s[key] !== "") out[key] = Number(s[key]);
  }
  const maxTokens = parseInt(s.max_tokens, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) out.max_tokens = maxTokens;
  return out;
}

async function loadDefaults() {
  try {
    state.defaults = await request("GET", "api/defaults");
    showSettings();
  } catch {
    // no key yet, or the server is away: the inputs keep what they show until the next try
  }
}

// ---------------------------------------------------------------------------------------------------------
// Conversations

async function loadConversations() {
  try {
    state.conversations = await request("GET", "api/conversations");
  } catch (err) {
    showError(err);
  }
  renderConversations();
}

async function openConversation(id) {
  const conv = await request("GET", `api/conversations/${id}`);
  const { messages = [], ...rest } = conv;
  state.conversation = rest;
  state.items = groupMessages(messages);
  history.replaceState(null, "", `#/c/${id}`);
  renderAll();
  scrollToEnd(true);
}

/**
 * Consecutive active answers to the same message are a comparison not decided yet (choosing hides the other
 * answer); show them side by side. Message dicts do not say which comparison they belong to, so such a pair,
 * loaded from the server, cannot be decided here (no "I prefer this"); the pair streamed in this page can.
 */
function groupMessages(messages) {
  const items = [];
  for (const msg of messages) {
    const last = items[items.length - 1];
    const lastMsg = last && (last.kind === "message" ? last.msg : last.msgs[last.msgs.length - 1]);
    const sameParent = !lastMsg || !("parent_id" in msg) || lastMsg.parent_id === msg.parent_id;
    if (msg.role === "assistant" && lastMsg && lastMsg.role === "assistant" && sameParent) {
      const msgs = last.kind === "message" ? [last.msg, msg] : [...last.msgs, msg];
      const comparisonId = msg.comparison_id ?? null;
      items[items.length - 1] = { kind: "compare", comparisonId, msgs, note: msg.compare_note ?? null };
    } else {
      items.push({ kind: "message", msg });
    }
  }
  return items;
}

function newChat() {
  if (state.busy) return;
  state.conversation = null;
  state.items = [];
  history.replaceState(null, "", location.pathname);
  clearError();
  renderAll();
  closeSidebar();
  $("composer").focus();
}

async function deleteConversation(id) {
  try {
    await request("DELETE", `api/conversations/${id}`);
    if (state.conversation && state.conversation.id === id) newChat();
  } catch (err) {
    showError(err);
  }
  await loadConversations();
}

function titleFrom(text) {
  const line = text.split("\n").find((l) => l.trim()) || "New chat";
  return line.trim().length > 60 ? `${line.trim().slice(0, 57)}…` : line.trim();
}

// ---------------------------------------------------------------------------------------------------------
// Replies

function streamingMessage() {
  return { id: null, role: "assistant", content: "", tool_calls: [], rating: 0, flags: [], streaming: true };
}

function awaitingChoice() {
  const last = state.items[state.items.length - 1];
  return Boolean(last && last.kind === "compare" && last.comparisonId != null);
}

/**
 * POST a reply request and stream its answer(s) into the thread. `userMsg` is the user message the server
 * will echo back as a `user` event (the new or edited one), or null when regenerating.
 */
async function streamReply(body, userMsg) {
  const choices = body.compare ? 2 : 1;
  const drafts = Array.from({ length: choices }, streamingMessage);
  const item =
    choices === 2 ? { kind: "compare", comparisonId: null, msgs: drafts, note: null } : { kind: "message", msg: drafts[0] };
  state.items.push(item);
  renderThread();
  scrollToEnd(true);
  window.llmlab.streamLog = [];

  let res;
  try {
    res = await fetch(`api/conversations/${state.conversation.id}/reply`, {
      method: "POST",
      headers: { ...requestHeaders(true), Accept: "text/event-stream" },
      body: JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(`Cannot reach the server (${err.message}).`, "network_error");
  }
  if (!res.ok) throw await errorFromResponse(res);

  let finished = false;
  for await (const event of readEvents(res)) {
    const draft = drafts[event.choice ?? 0];
    if (event.type === "user" && userMsg) {
      Object.assign(userMsg, event.message);
      updateMessage(userMsg);
    } else if (event.type === "delta" && draft) {
      draft.content += event.text;
      appendStreamText(draft, event.text);
      window.llmlab.streamLog.push({ choice: event.choice ?? 0, length: draft.content.length });
    } else if (event.type === "tool" && draft) {
      const call = { call: event.call, result: event.result };
      draft.tool_calls.push(call);
      appendStreamTool(draft, call);
    } else if (event.type === "retry" && draft) {
      // the answer came out the same as the other one: the server samples it again, and it streams in anew
      drafts[event.choice] = streamingMessage();
      item.note = event.message || null;
      renderThread();
      scrollToEnd(false);
    } else if (event.type === "error") {
      throw new ApiError(event.message || "The server failed while answering.", "stream_error");
    } else if (event.type === "done") {
      const stored = event.messages || [];
      if (!stored.length) throw new ApiError("The server finished without storing an answer.", "stream_error");
      const index = state.items.indexOf(item);
      state.items[index] =
        stored.length > 1
          ? { kind: "compare", comparisonId: event.comparison_id ?? null, msgs: stored, note: event.note ?? null }
          : { kind: "message", msg: stored[0] };
      // the stored answers bring their buttons ("I prefer this", ratings): keep the end of the thread, with
      // them, in view if the reader was following the answer there
      const following = nearEnd();
      renderThread();
      if (following) scrollToEnd(true);
      finished = true; // read on to `[DONE]`, so the response ends cleanly
    }
  }
  if (!finished) throw new ApiError("The answer stream ended before the answer was complete.", "stream_error");
}

/** Run one reply request with the page marked busy; on failure, reload what the server kept and say why. */
async function runReply(body, userMsg) {
  setBusy(true);
  clearError();
  try {
    const who = state.assistant ? { assistant: state.assistant } : {};
    await streamReply({ ...samplingSettings(), ...body, ...who, ...(state.compare ? { compare: true } : {}) }, userMsg);
    return true;
  } catch (err) {
    const cid = state.conversation && state.conversation.id;
    try {
      if (cid != null) await openConversation(cid);
    } catch {
      // the server cannot be asked: keep what was shown, minus answers that never got any text
      const messagesOf = (item) => item.msgs || [item.msg];
      state.items = state.items.filter((item) => messagesOf(item).some((m) => m.id != null || m.content));
      for (const item of state.items) for (const m of messagesOf(item)) m.streaming = false;
      renderThread();
    }
    showError(err);
    return false;
  } finally {
    setBusy(false);
    loadConversations();
  }
}

async function sendMessage(text) {
  if (state.busy || awaitingChoice() || !text.trim()) return;
  const composer = $("composer");
  composer.value = "";
  autosize(composer);
  if (!state.conversation) {
    try {
      const system = state.settings.system.trim();
      state.conversation = await request("POST", "api/conversations", {
        title: titleFrom(text),
        ...(system ? { system } : {}),
      });
      state.items = [];
      history.replaceState(null, "", `#/c/${state.conversation.id}`);
      renderAll();
    } catch (err) {
      composer.value = text;
      showError(err);
      return;
    }
  }
  const userMsg = { id: null, role: "user", content: text, tool_calls: [], rating: 0, flags: [] };
  state.items.push({ kind: "message", msg: userMsg });
  const ok = await runReply({ content: text }, userMsg);
  // the message never reached the server: give the text back rather than lose it
  const kept = state.items.some((it) => it.kind === "message" && it.msg.role === "user" && it.msg.content === text);
  if (!ok && !kept && !composer.value) composer.value = text;
}

async function regenerate() {
  if (state.busy) return;
  const last = state.items[state.items.length - 1];
  if (last && (last.kind === "compare" || last.msg.role === "assistant")) state.items.pop();
  await runReply({ regenerate: true }, null);
}

async function saveEdit(msg, text) {
  if (state.busy || !text.trim()) return;
  const index = state.items.findIndex((it) => it.msg === msg);
  state.items = state.items.slice(0, index + 1);
  msg.content = text;
  renderThread();
  await runReply({ edit_message_id: msg.id, content: text }, msg);
}

async function choose(item, msg) {
  if (state.busy) return;
  try {
    await request("POST", `api/comparisons/${item.comparisonId}/choose`, { message_id: msg.id });
    state.items[state.items.indexOf(item)] = { kind: "message", msg };
    renderThread();
    renderComposer();
  } catch (err) {
    showError(err);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Feedback

async function rate(msg, value) {
  const rating = msg.rating === value ? 0 : value;
  try {
    Object.assign(msg, await request("POST", `api/messages/${msg.id}/rating`, { rating }));
    updateMessage(msg);
  } catch (err) {
    showError(err);
  }
}

async function flag(msg, reason, correction) {
  try {
    const body = { reason, ...(correction ? { correction } : {}) };
    Object.assign(msg, await request("POST", `api/messages/${msg.id}/flag`, body));
    updateMessage(msg);
    return true;
  } catch (err) {
    showError(err);
    return false;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Drawing

function formatWhen(value) {
  if (value === null || value === undefined) return "";
  const ms = typeof value === "number" ? (value < 1e12 ? value * 1000 : value) : Date.parse(value);
  if (!Number.isFinite(ms)) return "";
  const date = new Date(ms);
  const now = new Date();
  if (date.toDateString() === now.toDateString()) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  return date.toLocaleDateString([], { month: "short", day: "numeric" });
}

function renderConversations() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const active = state.conversation && state.conversation.id === conv.id;
    const del = h(
      "button",
      {
        type: "button",
        class: "icon-button conv-delete",
        "data-testid": "delete-conversation",
        "aria-label": "Delete conversation",
        title: "Delete",
      },
      icon("trash"),
    );
    // two clicks to delete: the first arms the button for a few seconds
    del.addEventListener("click", () => {
      if (state.busy) return;
      if (del.classList.contains("armed")) return deleteConversation(conv.id);
      del.classList.add("armed");
      del.title = "Click again to delete";
      del.append(h("span", { class: "armed-label" }, "Delete"));
      setTimeout(() => renderConversations(), 4000);
    });
    list.append(
      h(
        "li",
        { class: `conv-item${active ? " active" : ""}`, "data-testid": "conversation-item", "data-conversation-id": conv.id },
        h(
          "button",
          {
            type: "button",
            class: "conv-open",
            "aria-current": active ? "true" : null,
            onclick: () => {
              if (state.busy) return;
              closeSidebar();
              openConversation(conv.id).catch(showError);
            },
          },
          h("span", { class: "conv-title" }, conv.title || "Untitled"),
          h("span", { class: "conv-when" }, formatWhen(conv.updated ?? conv.created)),
        ),
        del,
      ),
    );
  }
  $("conversation-empty").hidden = state.conversations.length > 0;
}

function toolEl(call) {
  return h(
    "div",
    { class: "tool", "data-testid": "tool-call" },
    h("span", { class: "tool-call" }, call.call),
    h("span", { class: "tool-arrow", "aria-hidden": "true" }, "→"),
    h("span", { class: "tool-result" }, call.result),
  );
}

function actionButton(name, label, testid, onclick, { iconClass = "", ...attrs } = {}) {
  return h(
    "button",
    { type: "button", class: "icon-button action", "data-testid": testid, "aria-label": label, title: label, onclick, ...attrs },
    icon(name, iconClass),
  );
}

function isLastMessage(msg) {
  const last = state.items[state.items.length - 1];
  return Boolean(last && last.kind === "message" && last.msg === msg);
}

/** The flag form under an assistant message: a required reason and an optional better answer. */
function flagForm(msg, article) {
  const reason = h("textarea", {
    class: "input",
    rows: 2,
    required: true,
    "data-testid": "flag-reason",
    placeholder: "What is wrong with this answer? (required)",
    "aria-label": "Reason",
  });
  const correction = h("textarea", {
    class: "input",
    rows: 3,
    "data-testid": "flag-correction",
    placeholder: "A better answer (optional)",
    "aria-label": "Better answer",
  });
  const form = h(
    "form",
    { class: "inline-form flag-form", "data-testid": "flag-form" },
    h("div", { class: "form-title" }, "Flag this answer"),
    reason,
    correction,
    h(
      "div",
      { class: "form-buttons" },
      h("button", { type: "button", class: "button", onclick: () => form.remove() }, "Cancel"),
      h("button", { type: "submit", class: "button button-danger", "data-testid": "flag-submit" }, "Flag answer"),
    ),
  );
  reason.addEventListener("input", () => reason.setCustomValidity(""));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!reason.value.trim()) {
      reason.setCustomValidity("Please say what is wrong.");
      reason.reportValidity();
      return;
    }
    form.querySelector("[type=submit]").disabled = true;
    if (!(await flag(msg, reason.value.trim(), correction.value.trim()))) form.querySelector("[type=submit]").disabled = false;
  });
  article.append(form);
  reason.focus();
}

/** Swap a user message's bubble for a textarea; saving answers again from the edited message. */
function editForm(msg, article) {
  const bubble = article.querySelector(".bubble");
  const editor = h("textarea", { class: "input", rows: 3, "data-testid": "edit-input", "aria-label": "Edit message" });
  editor.value = msg.content;
  const form = h(
    "form",
    { class: "inline-form edit-form", "data-testid": "edit-form" },
    editor,
    h(
      "div",
      { class: "form-buttons" },
      h("button", { type: "button", class: "button", onclick: () => updateMessage(msg) }, "Cancel"),
      h("button", { type: "submit", class: "button button-primary", "data-testid": "edit-save" }, "Save & answer"),
    ),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    saveEdit(msg, editor.value.trim());
  });
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Escape") updateMessage(msg);
  });
  bubble.replaceWith(form);
  article.querySelector(".actions")?.remove();
  editor.focus();
  editor.setSelectionRange(editor.value.length, editor.value.length);
}

function messageEl(msg, { inCompare = false } = {}) {
  const role = msg.role || "assistant";
  const article = h("article", {
    class: `msg msg-${role}${msg.streaming ? " streaming" : ""}`,
    "data-testid": `message-${role}`,
    "data-message-id": msg.id ?? "",
  });
  messageEls.set(msg, article);
  if (role === "system") {
    article.append(h("div", { class: "system-note" }, h("strong", {}, "System: "), msg.content));
    return article;
  }
  const bubble = h("div", { class: "bubble" });
  if (msg.tool_calls && msg.tool_calls.length) bubble.append(h("div", { class: "tools" }, msg.tool_calls.map(toolEl)));
  bubble.append(h("div", { class: "text", "data-testid": "message-text" }, msg.content));
  const cited = msg.settings && msg.settings.citation;
  if (cited) {
    bubble.append(h("div", { class: "citation", "data-testid": "citation", title: cited.text },
      `${msg.model}: from ${cited.file}, passage ${cited.passage}`));
  }
  article.append(bubble);
  if (msg.id === null || msg.id === undefined) return article; // still streaming or not stored: nothing to act on

  const actions = h("div", { class: "actions" });
  if (role === "user") {
    actions.append(actionButton("edit", "Edit", "edit", () => !state.busy && editForm(msg, article)));
  } else if (!inCompare) {
    const rating = msg.rating || 0;
    actions.append(
      actionButton("thumb", "Good answer", "thumb-up", () => rate(msg, 1), {
        "aria-pressed": String(rating === 1),
        class: `icon-button action thumb${rating === 1 ? " on-up" : ""}`,
      }),
      actionButton("thumb", "Bad answer", "thumb-down", () => rate(msg, -1), {
        "aria-pressed": String(rating === -1),
        class: `icon-button action thumb${rating === -1 ? " on-down" : ""}`,
        iconClass: "flip",
      }),
      actionButton("flag", "Flag this answer", "flag", () => {
        if (!article.querySelector(".flag-form")) flagForm(msg, article);
      }),
    );
    if (isLastMessage(msg)) {
      actions.append(actionButton("regenerate", "Regenerate", "regenerate", regenerate));
    }
    if (msg.flags && msg.flags.length) {
      const last = msg.flags[msg.flags.length - 1];
      actions.append(h("span", { class: "badge", "data-testid": "flagged", title: last.reason }, "Flagged"));
    }
  }
  article.append(actions);
  return article;
}

function compareEl(item) {
  const undecided = item.comparisonId == null && item.msgs.every((m) => m.id != null);
  return h(
    "div",
    { class: "compare", "data-testid": "compare" },
    undecided
      ? h("p", { class: "compare-note", "data-testid": "compare-note" },
          "Left undecided: the conversation continues from answer A.")
      : null,
    item.note
      ? h("p", { class: "compare-note compare-notice", "data-testid": "compare-notice", role: "status" }, item.note)
      : null,
    item.msgs.map((msg, i) =>
      h(
        "div",
        { class: "compare-col" },
        h("div", { class: "compare-label" }, `Answer ${String.fromCharCode(65 + i)}`),
        messageEl(msg, { inCompare: true }),
        item.comparisonId != null && msg.id != null
          ? h(
              "button",
              { type: "button", class: "button prefer", "data-testid": "prefer", onclick: () => choose(item, msg) },
              "I prefer this",
            )
          : null,
      ),
    ),
  );
}

function renderThread() {
  const thread = $("thread");
  messageEls.clear();
  const nodes = [];
  const system = state.conversation && state.conversation.system;
  if (system && !state.items.some((it) => it.kind === "message" && it.msg.role === "system")) {
    nodes.push(h("div", { class: "system-note", "data-testid": "system-note" }, h("strong", {}, "System: "), system));
  }
  for (const item of state.items) nodes.push(item.kind === "compare" ? compareEl(item) : messageEl(item.msg));
  if (!state.items.length) {
    nodes.push(
      h(
        "div",
        { class: "welcome" },
        h("h2", {}, "What can I help with?"),
        h("p", {}, "Answers stream in as they are generated. Rate them, flag them, or compare two side by side: "
          + "your feedback becomes training data."),
      ),
    );
  }
  thread.replaceChildren(...nodes);
  renderComposer();
}

function updateMessage(msg) {
  const old = messageEls.get(msg);
  if (!old) return renderThread();
  const inCompare = Boolean(old.closest(".compare"));
  old.replaceWith(messageEl(msg, { inCompare }));
}

function appendStreamText(msg, text) {
  const article = messageEls.get(msg);
  if (!article) return;
  article.querySelector(".text").append(text);
  scrollToEnd(false);
}

function appendStreamTool(msg, call) {
  const article = messageEls.get(msg);
  if (!article) return;
  const bubble = article.querySelector(".bubble");
  let tools = bubble.querySelector(".tools");
  if (!tools) {
    tools = h("div", { class: "tools" });
    bubble.prepend(tools);
  }
  tools.append(toolEl(call));
  scrollToEnd(false);
}

function renderComposer() {
  const waiting = awaitingChoice();
  $("send").disabled = state.busy || waiting;
  $("composer-hint").textContent = waiting
    ? "Pick the answer you prefer to continue."
    : state.busy
      ? "Answering…"
      : "Enter to send, Shift+Enter for a new line";
  $("composer-hint").classList.toggle("attention", waiting);
}

function renderAll() {
  $("chat-title").textContent = (state.conversation && state.conversation.title) || "New chat";
  document.title = state.conversation && state.conversation.title ? `${state.conversation.title} · llmlab` : "llmlab chat";
  renderConversations();
  renderThread();
}

function setBusy(busy) {
  state.busy = busy;
  $("app").classList.toggle("busy", busy);
  renderComposer();
}

function showError(err) {
  let text = err && err.message ? err.message : String(err);
  if (err && err.status === 401) {
    text += " (set the API key under Settings)";
    $("settings").open = true;
  }
  $("error-text").textContent = text;
  $("error").hidden = false;
  scrollToEnd(true);
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

/** Whether the thread is scrolled to (about) its end: new text then keeps it there. */
function nearEnd() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
}

function scrollToEnd(force) {
  const box = $("messages");
  if (force || nearEnd()) box.scrollTop = box.scrollHeight;
}

function autosize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${Math.min(textarea.scrollHeight, 200)}px`;
}

let sidebarTimer = 0;

function animateSidebar() {
  $("app").classList.add("sidebar-moving");
  clearTimeout(sidebarTimer);
  sidebarTimer = setTimeout(() => $("app").classList.remove("sidebar-moving"), 250);
}

function openSidebar() {
  animateSidebar();
  $("app").classList.add("sidebar-open");
  $("scrim").hidden = false;
  $("sidebar-toggle").setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  if ($("app").classList.contains("sidebar-open")) animateSidebar();
  $("app").classList.remove("sidebar-open");
  $("scrim").hidden = true;
  $("sidebar-toggle").setAttribute("aria-expanded", "false");
}

// ---------------------------------------------------------------------------------------------------------
// Wiring

const SETTING_FIELDS = [
  ["temperature", "temperature", (v) => Number(v).toFixed(2)],
  ["top-p", "top_p", (v) => Number(v).toFixed(2)],
  ["max-tokens", "max_tokens", null],
  ["system-prompt", "system", null],
];

/** Put each setting in its input: the user's value, else the server's default (once loaded). */
function showSettings() {
  for (const [id, key, show] of SETTING_FIELDS) {
    const value = state.settings[key] ?? state.defaults[key];
    if (value === undefined) continue;
    $(id).value = value;
    const output = show && $(`${id}-value`);
    if (output) output.textContent = show(value);
  }
}

function bindSettings() {
  const s = state.settings;
  showSettings();
  for (const [id, key, show] of SETTING_FIELDS) {
    const input = $(id);
    const output = show && $(`${id}-value`);
    input.addEventListener("input", () => {
      s[key] = input.value;
      if (output) output.textContent = show(input.value);
      saved.set("llmlab.settings", s);
    });
  }
  $("settings-form").addEventListener("submit", (event) => event.preventDefault()); // settings apply as typed
  const key = $("api-key");
  key.value = state.apiKey;
  key.addEventListener("input", () => {
    state.apiKey = key.value.trim();
    saved.set("llmlab.apiKey", state.apiKey);
  });
  key.addEventListener("change", () => {
    // what failed without the key may work with it: ask again
    clearError();
    showModelName();
    loadDefaults();
    loadConversations();
  });
  const compare = $("compare-toggle");
  compare.checked = state.compare;
  compare.addEventListener("change", () => {
    state.compare = compare.checked;
    saved.set("llmlab.compare", state.compare);
  });
}

function bindComposer() {
  const composer = $("composer");
  $("composer-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage(composer.value);
  });
  composer.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer-form").requestSubmit();
    }
  });
  composer.addEventListener("input", () => autosize(composer));
}

async function showModelName() {
  try {
    const models = await request("GET", "v1/models");
    const name = models.data && models.data[0] && models.data[0].id;
    $("model-name").textContent = name || "";
    $("model-name").hidden = !name;
  } catch {
    $("model-name").hidden = true; // the header can live without it; replies will report real failures
  }
}

// ---------------------------------------------------------------------------------------------------------
// Custom assistants: the picker (who answers) and the form that creates one

async function loadAssistants() {
  try {
    state.assistants = await request("GET", "api/assistants");
  } catch {
    state.assistants = []; // the picker offers the model alone
  }
  renderPicker();
}

function renderPicker() {
  const picker = $("assistant-picker");
  const names = state.assistants.map((a) => a.name);
  if (state.assistant && !names.includes(state.assistant)) state.assistant = ""; // deleted since
  picker.replaceChildren(
    h("option", { value: "" }, "Model"),
    ...state.assistants.map((a) => h("option", { value: a.name, title: a.instructions }, `${a.name} (${a.files.length} file${a.files.length === 1 ? "" : "s"})`)),
  );
  picker.value = state.assistant;
}

function pickAssistant(name) {
  state.assistant = name;
  saved.set("llmlab.assistant", name);
  renderPicker();
}

function fileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new ApiError(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function createAssistant(event) {
  event.preventDefault();
  const error = $("assistant-error");
  error.hidden = true;
  const button = $("assistant-create");
  button.disabled = true;
  try {
    const files = await Promise.all([...$("assistant-files").files].map(async (f) => ({
      name: f.name, content: await fileAsBase64(f),
    })));
    const tools = [...document.querySelectorAll("#assistant-form input[name=tool]:checked")].map((i) => i.value);
    const made = await request("POST", "api/assistants", {
      name: $("assistant-name").value.trim(), instructions: $("assistant-instructions").value, tools, files,
    });
    $("assistant-dialog").close();
    $("assistant-form").reset();
    await loadAssistants();
    pickAssistant(made.name);
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

function bindAssistants() {
  $("assistant-picker").addEventListener("change", (event) => pickAssistant(event.target.value));
  $("new-assistant").addEventListener("click", () => {
    $("assistant-error").hidden = true;
    $("assistant-dialog").showModal();
  });
  $("assistant-cancel").addEventListener("click", () => $("assistant-dialog").close());
  $("assistant-form").addEventListener("submit", createAssistant);
}

function init() {
  for (const slot of document.querySelectorAll("[data-icon]")) slot.replaceWith(icon(slot.dataset.icon));
  bindSettings();
  bindComposer();
  bindAssistants();
  $("new-chat").addEventListener("click", newChat);
  $("sidebar-toggle").addEventListener("click", () =>
    $("app").classList.contains("sidebar-open") ? closeSidebar() : openSidebar(),
  );
  $("scrim").addEventListener("click", closeSidebar);
  $("error-dismiss").addEventListener("click", clearError);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeSidebar();
  });
  window.addEventListener("hashchange", openFromHash);
  renderAll();
  showModelName();
  loadAssistants();
  loadDefaults();
  loadConversations();
  openFromHash();
}

/** A link to #/c/<id> (a bookmark, a reload) opens that conversation. */
function openFromHash() {
  const match = location.hash.match(/^#\/c\/(\d+)$/);
  if (!match || state.busy || (state.conversation && state.conversation.id === Number(match[1]))) return;
  openConversation(Number(match[1])).catch((err) => {
    history.replaceState(null, "", location.pathname);
    showError(err);
  });
}

init();
