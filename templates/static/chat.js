// llmis chat page. No framework, no CDN: everything here is served by llmis itself.
//
// Model output is Markdown: it is rendered with marked (raw HTML in it is escaped, shown as
// text), then sanitised by DOMPurify down to the Markdown tags in RENDERED_TAGS, then code
// blocks are highlighted by highlight.js. User messages are only ever set with textContent.
// Replies stream over the /v1/ws WebSocket; when the socket cannot be opened the page falls
// back to POST /v1/chat/completions with SSE streaming.
"use strict";

(() => {
  const STORE_KEY = "llmis.chat.conversations.v2";
  const OLD_HISTORY_KEY = "llmis.chat.history.v1"; // one conversation, before v2
  const SETTINGS_KEY = "llmis.chat.settings.v1";
  const KEY_KEY = "llmis.chat.apikey"; // sessionStorage: the key lives as long as the tab
  const SETTING_IDS = ["system", "temperature", "top_p", "max_tokens", "extra", "model", "model2"];
  // What sanitised Markdown may contain: nothing else survives DOMPurify.
  const RENDERED_TAGS = [
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
  ];

  const $ = (id) => document.getElementById(id);
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // text, never markup
    return node;
  };

  // ----- Markdown -----

  const escapeHtml = (text) =>
    text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  if (window.marked) {
    window.marked.use({
      gfm: true,
      breaks: true,
      renderer: {
        html(token) {
          return escapeHtml(token.text || token.raw || ""); // raw HTML from a model is text
        },
      },
    });
  }

  function renderMarkdown(container, text) {
    if (!window.marked || !window.DOMPurify) {
      container.textContent = text;
      return;
    }
    const html = window.DOMPurify.sanitize(window.marked.parse(text), {
      ALLOWED_TAGS: RENDERED_TAGS,
      ALLOWED_ATTR: ["href", "title", "class"],
      ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
    });
    container.innerHTML = html.trim();
    for (const link of container.querySelectorAll("a")) {
      link.rel = "noopener noreferrer";
      link.target = "_blank";
    }
    for (const code of container.querySelectorAll("pre > code")) {
      if (window.hljs) {
        const lang = (code.className.match(/language-([\w+-]+)/) || [])[1];
        if (lang && window.hljs.getLanguage(lang)) {
          code.innerHTML = window.hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }).value;
        } else {
          code.innerHTML = window.hljs.highlightAuto(code.textContent).value;
        }
        code.classList.add("hljs");
      }
      const pre = code.parentElement;
      const copy = el("button", "copy", "Copy");
      copy.type = "button";
      copy.title = "Copy the code";
      copy.addEventListener("click", () => copyText(code.textContent, copy));
      pre.classList.add("codeblock");
      pre.prepend(copy);
    }
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = el("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    button.dataset.copied = "true";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  }

  // ----- persistence -----

  const load = (key, fallback, storage = localStorage) => {
    try {
      const value = JSON.parse(storage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  };

  const newId = () => `chat-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 7)}`;
  const newConversation = (turns = []) => ({ id: newId(), title: "", created: Date.now(), updated: Date.now(), turns });

  const store = load(STORE_KEY, { current: null, list: [] });
  if (!Array.isArray(store.list)) store.list = [];
  const old = load(OLD_HISTORY_KEY, null);
  if (old && Array.isArray(old.turns)) {
    // an older page's single conversation (or one put there by a test): it becomes the current one
    const conv = newConversation(old.turns);
    store.list.unshift(conv);
    store.current = conv.id;
    localStorage.setItem(STORE_KEY, JSON.stringify(store));
    localStorage.removeItem(OLD_HISTORY_KEY);
  }
  for (const conv of store.list) {
    if (!Array.isArray(conv.turns)) conv.turns = [];
    for (const turn of conv.turns) {
      for (const reply of turn.replies || []) {
        if (reply.status === "streaming" || reply.status === "stopping") reply.status = "interrupted";
      }
    }
  }
  const saveStore = () => {
    const plain = JSON.stringify(store, (key, value) => (key === "view" ? undefined : value));
    localStorage.setItem(STORE_KEY, plain);
  };
  const current = () => {
    let conv = store.list.find((c) => c.id === store.current);
    if (!conv) {
      conv = store.list[0] || newConversation();
      if (!store.list.includes(conv)) store.list.unshift(conv);
      store.current = conv.id;
    }
    return conv;
  };
  const titleOf = (conv) => conv.title || (conv.turns[0] && conv.turns[0].user.slice(0, 60)) || "New chat";

  const settings = load(SETTINGS_KEY, {});
  const saveSettings = () => {
    const values = {};
    for (const id of SETTING_IDS) values[id] = $(id).value;
    values.compare = $("compare").checked;
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
  };

  const apiKey = () => sessionStorage.getItem(KEY_KEY) || "";
  const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});
  // The key goes to the WebSocket as a subprotocol (base64url), never in the URL.
  const b64url = (text) =>
    btoa(String.fromCharCode(...new TextEncoder().encode(text))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

  // ----- transports: WebSocket first, SSE as the fallback -----

  class SocketTransport {
    constructor(url) {
      this.url = url;
      this.socket = null;
      this.opening = null;
      this.handlers = new Map();
    }

    open() {
      if (this.socket && this.socket.readyState === WebSocket.OPEN) return Promise.resolve();
      if (this.opening) return this.opening;
      this.opening = new Promise((resolve, reject) => {
        const key = apiKey();
        const socket = key ? new WebSocket(this.url, ["llmis.v1", `llmis.bearer.${b64url(key)}`]) : new WebSocket(this.url);
        let opened = false;
        socket.onopen = () => {
          opened = true;
          this.socket = socket;
          this.opening = null;
          resolve();
        };
        socket.onerror = () => {
          if (!opened) {
            this.opening = null;
            reject(new Error("WebSocket unavailable"));
          }
        };
        socket.onclose = () => {
          if (this.socket === socket) this.socket = null;
          for (const [id, h] of this.handlers) h.onError({ message: "the connection was lost" }, id);
          this.handlers.clear();
        };
        socket.onmessage = (event) => this.dispatch(JSON.parse(event.data));
      });
      return this.opening;
    }

    close() {
      if (this.socket) this.socket.close();
    }

    dispatch(event) {
      const h = this.handlers.get(event.id);
      if (!h) return; // e.g. the answer to a cancel that raced the end of its generation
      if (event.type === "delta") h.onDelta(event.content);
      else if (event.type === "done") {
        this.handlers.delete(event.id);
        h.onDone(event);
      } else if (event.type === "error") {
        this.handlers.delete(event.id);
        h.onError(event.error);
      }
    }

    async chat(id, body, handlers) {
      await this.open();
      this.handlers.set(id, handlers);
      this.socket.send(JSON.stringify({ type: "chat", id, ...body }));
    }

    cancel(id) {
      if (this.socket && this.handlers.has(id)) this.socket.send(JSON.stringify({ type: "cancel", id }));
    }
  }

  class SseTransport {
    constructor() {
      this.controllers = new Map();
    }

    close() {}

    async chat(id, body, handlers) {
      const controller = new AbortController();
      this.controllers.set(id, controller);
      let finish = null;
      let usage = null;
      try {
        const response = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: { "Content-Type": "application/json", ...authHeaders() },
          body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
          signal: controller.signal,
        });
        if (!response.ok) {
          const payload = await response.json().catch(() => ({}));
          handlers.onError(payload.error || { message: `HTTP ${response.status}` });
          return;
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            for (const line of frame.split("\n")) {
              if (!line.startsWith("data: ")) continue; // ": ping" comments
              const data = line.slice(6);
              if (data === "[DONE]") {
                handlers.onDone({ finish_reason: finish, usage });
                return;
              }
              const chunk = JSON.parse(data);
              if (chunk.error) {
                handlers.onError(chunk.error);
                return;
              }
              if (chunk.usage) usage = chunk.usage;
              const choice = (chunk.choices || [])[0];
              if (choice && choice.delta && choice.delta.content) handlers.onDelta(choice.delta.content);
              if (choice && choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
        handlers.onError({ message: "the stream ended early" });
      } catch (error) {
        if (controller.signal.aborted) handlers.onDone({ finish_reason: "cancelled", usage: null });
        else handlers.onError({ message: String(error.message || error) });
      } finally {
        this.controllers.delete(id);
      }
    }

    cancel(id) {
      const controller = this.controllers.get(id);
      if (controller) controller.abort(); // the server cancels a generation whose client left
    }
  }

  const forceSse = new URLSearchParams(location.search).get("transport") === "sse";
  const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
  let transport = null;
  const setTransport = (t, label) => {
    transport = t;
    $("transport").textContent = label;
    $("transport").dataset.transport = label;
  };

  async function pickTransport() {
    if (transport) transport.close();
    if (!forceSse && "WebSocket" in window) {
      const socket = new SocketTransport(wsUrl);
      try {
        await socket.open();
        setTransport(socket, "WebSocket");
        return;
      } catch {
        // fall through to SSE
      }
    }
    setTransport(new SseTransport(), "SSE");
  }

  // ----- rendering -----

  const STATUS_TEXT = {
    streaming: "generating…",
    stopping: "stopping…",
    stop: "done",
    length: "max_tokens reached",
    cancelled: "stopped",
    interrupted: "interrupted",
    error: "error",
  };

  const trimText = (n) => `Context full: the server left out the ${n} oldest message(s) of this conversation for this reply.`;

  function statsText(reply) {
    const s = reply.stats;
    if (!s) return "";
    const parts = [`${s.tokens} tokens`];
    if (s.tps != null) parts.push(`${s.tps.toFixed(1)} tok/s`);
    if (s.ttft_ms != null) parts.push(`TTFT ${Math.round(s.ttft_ms)} ms`);
    return parts.join(" · ");
  }

  let renderQueued = new Set();
  function scheduleRender(reply) {
    renderQueued.add(reply);
    if (renderQueued.size > 1) return;
    requestAnimationFrame(() => {
      const replies = renderQueued;
      renderQueued = new Set();
      for (const r of replies) if (r.view) renderMarkdown(r.view.content, r.content);
      $("log").scrollTop = $("log").scrollHeight;
    });
  }

  function renderReply(reply, turnIndex, column) {
    const box = el("article", "reply");
    box.dataset.model = reply.model;
    box.dataset.status = reply.status;
    const head = el("header", "reply-head");
    head.append(el("span", "reply-model", reply.model), el("span", "reply-status", STATUS_TEXT[reply.status] || reply.status));
    const content = el("div", "content");
    renderMarkdown(content, reply.content || "");
    const footer = el("footer", "reply-foot");
    const stats = el("span", "reply-stats", statsText(reply));
    const regen = el("button", "regenerate", "Regenerate");
    regen.type = "button";
    regen.title = "Ask for this reply again";
    regen.addEventListener("click", () => regenerate(turnIndex, column));
    footer.append(stats, regen);
    box.append(head, content);
    if (reply.trimmed) box.append(el("p", "trim-notice", trimText(reply.trimmed)));
    if (reply.error) box.append(el("p", "error", reply.error));
    box.append(footer);
    reply.view = { box, content, status: head.lastChild, stats };
    return box;
  }

  function renderTurn(turn, index) {
    const node = el("section", "turn");
    const user = el("div", "user-row");
    const edit = el("button", "edit", "Edit");
    edit.type = "button";
    edit.title = "Edit this message and send it again";
    edit.addEventListener("click", () => startEdit(index));
    user.append(edit, el("div", "user", turn.user));
    node.append(user);
    const replies = el("div", turn.replies.length > 1 ? "replies compare" : "replies");
    turn.replies.forEach((reply, column) => replies.append(renderReply(reply, index, column)));
    node.append(replies);
    return node;
  }

  function renderAll() {
    const conv = current();
    const log = $("log");
    log.replaceChildren(...conv.turns.map(renderTurn));
    if (!conv.turns.length) log.append(el("p", "empty", "No messages yet. Pick a model and say something."));
    log.scrollTop = log.scrollHeight;
    renderList();
  }

  function renderList() {
    const query = $("chat-search").value.trim().toLowerCase();
    const items = [];
    for (const conv of store.list) {
      const title = titleOf(conv);
      const haystack = [title, ...conv.turns.flatMap((t) => [t.user, ...t.replies.map((r) => r.content)])].join("\n").toLowerCase();
      if (query && !haystack.includes(query)) continue;
      const li = el("li", conv.id === store.current ? "chat-item current" : "chat-item");
      li.dataset.id = conv.id;
      const open = el("button", "chat-open", title);
      open.type = "button";
      open.addEventListener("click", () => switchTo(conv.id));
      const rename = el("button", "chat-rename", "✎");
      rename.type = "button";
      rename.title = "Rename";
      rename.setAttribute("aria-label", `Rename ${title}`);
      rename.addEventListener("click", () => startRename(li, conv));
      const del = el("button", "chat-delete", "×");
      del.type = "button";
      del.title = "Delete";
      del.setAttribute("aria-label", `Delete ${title}`);
      del.addEventListener("click", () => deleteConversation(conv.id));
      li.append(open, rename, del);
      items.push(li);
    }
    $("chat-list").replaceChildren(...items);
  }

  function startRename(li, conv) {
    const input = el("input", "chat-title-input");
    input.value = titleOf(conv);
    input.setAttribute("aria-label", "Conversation title");
    li.replaceChildren(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      if (save && input.value.trim()) conv.title = input.value.trim();
      saveStore();
      renderList();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      else if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  function switchTo(id) {
    if (pending.size) stop();
    store.current = id;
    cancelEdit();
    saveStore();
    renderAll();
    document.body.classList.remove("chats-open");
  }

  function deleteConversation(id) {
    if (id === store.current && pending.size) stop();
    store.list = store.list.filter((c) => c.id !== id);
    if (store.current === id) store.current = store.list[0] ? store.list[0].id : null;
    saveStore();
    renderAll();
  }

  function exportConversations() {
    const plain = JSON.stringify({ exported: new Date().toISOString(), conversations: store.list }, (key, value) => (key === "view" ? undefined : value), 2);
    const link = el("a");
    link.href = URL.createObjectURL(new Blob([plain], { type: "application/json" }));
    link.download = "llmis-conversations.json";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  const setStatus = (reply, status) => {
    reply.status = status;
    if (reply.view) {
      reply.view.box.dataset.status = status;
      reply.view.status.textContent = STATUS_TEXT[status] || status;
    }
  };

  // ----- chatting -----

  const pending = new Map(); // id -> reply
  let nextId = 1;
  let editing = null; // index of the turn being edited

  function updateBusy() {
    const busy = pending.size > 0;
    $("stop").disabled = !busy;
    $("send").disabled = busy;
    document.body.dataset.busy = busy ? "true" : "false";
  }

  function showError(message) {
    const box = $("composer-error");
    box.textContent = message;
    box.hidden = !message;
  }

  function parameters() {
    const body = {};
    for (const name of ["temperature", "top_p"]) {
      const value = parseFloat($(name).value);
      if (!Number.isNaN(value)) body[name] = value;
    }
    const maxTokens = parseInt($("max_tokens").value, 10);
    if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
    const extra = $("extra").value.trim();
    if (extra) {
      let parsed;
      try {
        parsed = JSON.parse(extra);
      } catch (error) {
        throw new Error(`The extra request fields are not valid JSON: ${error.message}`);
      }
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new Error("The extra request fields must be a JSON object.");
      }
      Object.assign(body, parsed);
    }
    return body;
  }

  // The conversation as model ``column`` saw it: its own earlier replies, else the first column's.
  function messagesFor(turns, column, upTo) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of turns.slice(0, upTo)) {
      messages.push({ role: "user", content: turn.user });
      const reply = turn.replies[column] || turn.replies[0];
      if (reply && reply.content) messages.push({ role: "assistant", content: reply.content });
    }
    messages.push({ role: "user", content: turns[upTo].user });
    return messages;
  }

  function run(conv, index, column, params) {
    const turn = conv.turns[index];
    const reply = turn.replies[column];
    const id = `c${Date.now().toString(36)}-${nextId++}`;
    pending.set(id, reply);
    const sent = performance.now();
    let first = null;
    const finish = () => {
      pending.delete(id);
      conv.updated = Date.now();
      saveStore();
      updateBusy();
    };
    const body = { ...params, model: reply.model, messages: messagesFor(conv.turns, column, index) };
    transport
      .chat(id, body, {
        onDelta(text) {
          if (first === null) first = performance.now();
          reply.content += text;
          scheduleRender(reply);
        },
        onDone(event) {
          const end = performance.now();
          const tokens = event.usage ? event.usage.completion_tokens : null;
          if (tokens != null) {
            const genSeconds = first === null ? null : (end - first) / 1000;
            reply.stats = {
              tokens,
              tps: genSeconds && tokens > 1 ? (tokens - 1) / genSeconds : null,
              ttft_ms: first === null ? null : first - sent,
            };
            if (reply.view) reply.view.stats.textContent = statsText(reply);
          }
          if (event.trimmed) {
            reply.trimmed = event.trimmed;
            if (reply.view) reply.view.box.insertBefore(el("p", "trim-notice", trimText(event.trimmed)), reply.view.box.lastChild);
          }
          if (reply.view) renderMarkdown(reply.view.content, reply.content);
          setStatus(reply, event.finish_reason || "stop");
          finish();
        },
        onError(error) {
          reply.error = error.message || "unknown error";
          if (reply.view) reply.view.box.insertBefore(el("p", "error", reply.error), reply.view.box.lastChild);
          setStatus(reply, "error");
          finish();
        },
      })
      .catch((error) => {
        reply.error = String(error.message || error);
        setStatus(reply, "error");
        finish();
      });
  }

  // Returns false (and keeps the typed text) when the message cannot be sent.
  function send(text) {
    let params;
    try {
      params = parameters();
    } catch (error) {
      showError(error.message);
      return false;
    }
    if (!$("model").value) {
      showError(document.body.dataset.authRequired === "true" && !apiKey() ? "Enter the API key (Settings) to load the models." : "No model to send to.");
      return false;
    }
    showError("");
    const conv = current();
    if (editing !== null) {
      conv.turns.splice(editing);
      cancelEdit();
    }
    const models = [$("model").value];
    if ($("compare").checked && $("model2").value) models.push($("model2").value);
    const turn = { user: text, replies: models.map((model) => ({ model, content: "", status: "streaming" })) };
    conv.turns.push(turn);
    const index = conv.turns.length - 1;
    saveStore();
    renderAll();
    turn.replies.forEach((_, column) => run(conv, index, column, params));
    updateBusy();
    return true;
  }

  function regenerate(index, column) {
    if (pending.size) return;
    let params;
    try {
      params = parameters();
    } catch (error) {
      showError(error.message);
      return;
    }
    showError("");
    const conv = current();
    const turn = conv.turns[index];
    conv.turns.splice(index + 1); // later turns were answers to the old reply
    const model = turn.replies[column].model;
    turn.replies[column] = { model, content: "", status: "streaming" };
    saveStore();
    renderAll();
    run(conv, index, column, params);
    updateBusy();
  }

  function startEdit(index) {
    if (pending.size) return;
    editing = index;
    $("prompt").value = current().turns[index].user;
    $("editing").hidden = false;
    $("prompt").focus();
  }

  function cancelEdit() {
    editing = null;
    $("editing").hidden = true;
  }

  function stop() {
    for (const [id, reply] of pending) {
      setStatus(reply, "stopping");
      transport.cancel(id);
    }
  }

  // The model list: the server renders it; /v1/models keeps it fresh (and fills it when the
  // server needs a key). Embedding models are left out; presets get their own group.
  async function refreshModels() {
    try {
      const response = await fetch("/v1/models", { headers: authHeaders() });
      if (!response.ok) return;
      const { data } = await response.json();
      const chat = data.filter((m) => !m.embedding && !m.preset);
      const presets = data.filter((m) => m.preset);
      for (const select of [$("model"), $("model2")]) {
        const chosen = select.value || settings[select.id];
        const options = chat.map((m) => {
          const option = el("option", "", `${m.id} · ${m.state}`);
          option.value = m.id;
          option.dataset.state = m.state;
          if (m.context_length) option.dataset.ctx = m.context_length;
          return option;
        });
        const children = [...options];
        if (presets.length) {
          const group = el("optgroup");
          group.label = "Presets";
          for (const m of presets) {
            const option = el("option", "", `${m.id} (preset)`);
            option.value = m.id;
            option.dataset.preset = "true";
            if (m.description) option.title = m.description;
            group.append(option);
          }
          children.push(group);
        }
        select.replaceChildren(...children);
        if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
        else if (select.id === "model2" && select.options.length > 1) select.selectedIndex = 1;
      }
    } catch {
      // offline or restarting: keep the last known states
    }
  }

  // ----- wiring -----

  function restoreSettings() {
    for (const id of SETTING_IDS) {
      if (settings[id] === undefined) continue;
      const node = $(id);
      if (node.tagName === "SELECT" && ![...node.options].some((o) => o.value === settings[id])) continue;
      node.value = settings[id];
    }
    $("compare").checked = Boolean(settings.compare);
    $("model2").disabled = !$("compare").checked;
  }

  function toggleDrawer(name, open) {
    const cls = `${name}-open`;
    const show = open ?? !document.body.classList.contains(cls);
    document.body.classList.toggle(cls, show);
    const button = $(`${name}-toggle`);
    if (button) button.setAttribute("aria-expanded", String(show));
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("api-key").value = apiKey();
    await refreshModels();
    restoreSettings();
    current();
    renderAll();
    updateBusy();
    pickTransport();
    for (const id of SETTING_IDS) $(id).addEventListener("change", saveSettings);
    $("compare").addEventListener("change", () => {
      $("model2").disabled = !$("compare").checked;
      saveSettings();
    });
    $("api-key").addEventListener("change", async () => {
      sessionStorage.setItem(KEY_KEY, $("api-key").value.trim());
      await refreshModels();
      restoreSettings();
      pickTransport();
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value.trim();
      if (!text || pending.size || !transport) return;
      if (send(text)) $("prompt").value = ""; // kept when it could not be sent
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        $("composer").requestSubmit();
      } else if (event.key === "Escape" && editing !== null) {
        cancelEdit();
      }
    });
    $("cancel-edit").addEventListener("click", cancelEdit);
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => {
      if (pending.size) stop();
      const conv = newConversation();
      store.list.unshift(conv);
      store.current = conv.id;
      cancelEdit();
      saveStore();
      renderAll();
      document.body.classList.remove("chats-open");
    });
    $("chat-search").addEventListener("input", renderList);
    $("export-chats").addEventListener("click", exportConversations);
    $("settings-toggle").addEventListener("click", () => toggleDrawer("settings"));
    $("settings-close").addEventListener("click", () => toggleDrawer("settings", false));
    $("chats-toggle").addEventListener("click", () => toggleDrawer("chats"));
    setInterval(refreshModels, 10000);
  });
})();
