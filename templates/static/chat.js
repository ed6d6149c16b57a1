// llmis chat page. No framework, no CDN: everything here is served by llmis itself.
//
// Model output is only ever put into the page with textContent, never innerHTML, so no HTML
// or script from a model can run. Replies stream over the /v1/ws WebSocket; when the socket
// cannot be opened the page falls back to POST /v1/chat/completions with SSE streaming.
"use strict";

(() => {
  const HISTORY_KEY = "llmis.chat.history.v1";
  const SETTINGS_KEY = "llmis.chat.settings.v1";
  const SETTING_IDS = ["system", "temperature", "top_p", "max_tokens", "extra", "model", "model2"];

  const $ = (id) => document.getElementById(id);
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text; // text, never markup
    return node;
  };

  // ----- persistence -----

  const load = (key, fallback) => {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  };

  const history = load(HISTORY_KEY, { turns: [] });
  if (!Array.isArray(history.turns)) history.turns = [];
  for (const turn of history.turns) {
    for (const reply of turn.replies || []) {
      if (reply.status === "streaming" || reply.status === "stopping") reply.status = "interrupted";
    }
  }
  const saveHistory = () => localStorage.setItem(HISTORY_KEY, JSON.stringify(history));

  const settings = load(SETTINGS_KEY, {});
  const saveSettings = () => {
    const values = {};
    for (const id of SETTING_IDS) values[id] = $(id).value;
    values.compare = $("compare").checked;
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
  };

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
        const socket = new WebSocket(this.url);
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

    async chat(id, body, handlers) {
      const controller = new AbortController();
      this.controllers.set(id, controller);
      let finish = null;
      let usage = null;
      try {
        const response = await fetch("/v1/chat/completions", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
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

  // ----- rendering (textContent only) -----

  const STATUS_TEXT = {
    streaming: "generating…",
    stopping: "stopping…",
    stop: "done",
    length: "max_tokens reached",
    cancelled: "stopped",
    interrupted: "interrupted",
    error: "error",
  };

  function renderReply(reply) {
    const box = el("article", "reply");
    box.dataset.model = reply.model;
    box.dataset.status = reply.status;
    const head = el("header", "reply-head");
    head.append(el("span", "reply-model", reply.model), el("span", "reply-status", STATUS_TEXT[reply.status] || reply.status));
    const content = el("div", "content", reply.content);
    box.append(head, content);
    if (reply.trimmed) {
      box.append(
        el("p", "trim-notice", `Context full: the server left out the ${reply.trimmed} oldest message(s) of this conversation for this reply.`),
      );
    }
    if (reply.error) box.append(el("p", "error", reply.error));
    reply.view = { box, content, status: head.lastChild };
    return box;
  }

  function renderTurn(turn) {
    const node = el("section", "turn");
    node.append(el("div", "user", turn.user));
    const replies = el("div", turn.replies.length > 1 ? "replies compare" : "replies");
    for (const reply of turn.replies) replies.append(renderReply(reply));
    node.append(replies);
    return node;
  }

  function renderAll() {
    const log = $("log");
    log.replaceChildren(...history.turns.map(renderTurn));
    if (!history.turns.length) log.append(el("p", "empty", "No messages yet. Pick a model and say something."));
    log.scrollTop = log.scrollHeight;
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

  function updateBusy() {
    const busy = pending.size > 0;
    $("stop").disabled = !busy;
    $("send").disabled = busy;
    document.body.dataset.busy = busy ? "true" : "false";
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
    if (extra) Object.assign(body, JSON.parse(extra)); // a JSON error is shown to the user
    return body;
  }

  // The conversation as model ``column`` saw it: its own earlier replies, else the first column's.
  function messagesFor(column, upTo) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of history.turns.slice(0, upTo)) {
      messages.push({ role: "user", content: turn.user });
      const reply = turn.replies[column] || turn.replies[0];
      if (reply && reply.content) messages.push({ role: "assistant", content: reply.content });
    }
    messages.push({ role: "user", content: history.turns[upTo].user });
    return messages;
  }

  async function send(text) {
    let params;
    try {
      params = parameters();
    } catch (error) {
      alert(`The extra request fields are not valid JSON: ${error.message}`);
      return;
    }
    const models = [$("model").value];
    if ($("compare").checked) models.push($("model2").value);
    const turn = { user: text, replies: models.map((model) => ({ model, content: "", status: "streaming" })) };
    history.turns.push(turn);
    const index = history.turns.length - 1;
    saveHistory();
    renderAll();
    turn.replies.forEach((reply, column) => {
      const id = `c${Date.now().toString(36)}-${nextId++}`;
      pending.set(id, reply);
      const finish = () => {
        pending.delete(id);
        saveHistory();
        updateBusy();
      };
      const body = { ...params, model: reply.model, messages: messagesFor(column, index) };
      transport
        .chat(id, body, {
          onDelta(text) {
            reply.content += text;
            if (reply.view) reply.view.content.textContent = reply.content;
            $("log").scrollTop = $("log").scrollHeight;
          },
          onDone(event) {
            reply.usage = event.usage || null;
            if (event.trimmed) {
              reply.trimmed = event.trimmed;
              reply.view.box.append(el("p", "trim-notice", `Context full: the server left out the ${event.trimmed} oldest message(s) of this conversation for this reply.`));
            }
            setStatus(reply, event.finish_reason || "stop");
            finish();
          },
          onError(error) {
            reply.error = error.message || "unknown error";
            if (reply.view) reply.view.box.append(el("p", "error", reply.error));
            setStatus(reply, "error");
            finish();
          },
        })
        .catch((error) => {
          reply.error = String(error.message || error);
          setStatus(reply, "error");
          finish();
        });
    });
    updateBusy();
  }

  function stop() {
    for (const [id, reply] of pending) {
      setStatus(reply, "stopping");
      transport.cancel(id);
    }
  }

  // The model list is rendered by the server; keep its states fresh while the page is open.
  async function refreshModels() {
    try {
      const response = await fetch("/v1/models");
      if (!response.ok) return;
      const { data } = await response.json();
      const states = new Map(data.map((m) => [m.id, m.state]));
      for (const select of [$("model"), $("model2")]) {
        for (const option of select.options) {
          const state = states.get(option.value);
          if (state) {
            option.dataset.state = state;
            option.textContent = `${option.value} · ${state}`;
          }
        }
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

  document.addEventListener("DOMContentLoaded", () => {
    restoreSettings();
    renderAll();
    updateBusy();
    pickTransport();
    for (const id of SETTING_IDS) $(id).addEventListener("change", saveSettings);
    $("compare").addEventListener("change", () => {
      $("model2").disabled = !$("compare").checked;
      saveSettings();
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value.trim();
      if (!text || pending.size || !transport) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => {
      stop();
      history.turns = [];
      saveHistory();
      renderAll();
    });
    setInterval(refreshModels, 10000);
  });
})();
