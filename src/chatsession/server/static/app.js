// The chatsession web page: vanilla JS, no build step, nothing fetched from
// elsewhere. Every text the server or the model sends is put in the page as
// text (textContent / text nodes), never as HTML.
//
// Answers: when the server has the live-events route
// (GET /v1/sessions/{id}/events), a message is sent as a plain JSON request
// and the answer is shown from that stream, so the turn does not belong to
// this page's connection: a reload (or closing the tab) does not cancel it,
// and on load the page joins the turn from the last event id it had seen.
// Without that route, the message is sent with stream=true and the answer
// read from the POST's own event stream.
"use strict";

(() => {
  const KEY = "chatsession.key";
  const LIVE = "chatsession.live."; // + session id: {id, seq, text} of an answer in progress
  const PAGE_SIZE = 50;
  const HISTORY_PAGE = 500;

  const $ = (id) => document.getElementById(id);

  const S = {
    key: null,
    sessions: new Map(), // id -> session
    order: [], // ids in listing order (newest first)
    nextCursor: null,
    current: null, // the open session
    gen: 0, // bumped when another session is opened
    renderedSeq: 0, // the last log seq shown
    parentSeq: 0, // a fork's last inherited seq
    lastId: null, // the last event id seen for the open session
    eventsRoute: null, // true / false once the live-events route was tried
    watcher: null,
    live: null, // the answer in progress: {el, seq, text, textEl}
    sending: false,
    syncing: Promise.resolve(),
  };

  class ApiError extends Error {
    constructor(status, type, message, retryAfter) {
      super(message);
      this.status = status;
      this.type = type;
      this.retryAfter = retryAfter;
    }
  }

  // ---- small helpers --------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function shortId(id) {
    return id.length > 14 ? `${id.slice(0, 10)}…${id.slice(-4)}` : id;
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "";
  }

  function sessionName(session) {
    return session.title || `Session ${shortId(session.session_id)}`;
  }

  function say(id, text) {
    $(id).textContent = text || "";
  }

  function describeError(err) {
    if (err instanceof ApiError) {
      if (err.type === "session_busy") {
        const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
        return `This session is answering in another window.${wait}`;
      }
      if (err.status === 404) return "Not found (it does not exist, or it is not yours).";
      return `${err.message} (${err.status} ${err.type || ""})`.trim();
    }
    return String(err && err.message ? err.message : err);
  }

  // Event ids: "<seq>" or "<seq>-<n>" (n text deltas since seq).
  function parseId(id) {
    if (id === null || id === undefined) return null;
    const match = /^(\d+)(?:-(\d+))?$/.exec(String(id));
    if (!match) return null;
    return { seq: Number(match[1]), n: match[2] ? Number(match[2]) : 0 };
  }

  function idBefore(a, b) {
    if (!a || !b) return false;
    return a.seq < b.seq || (a.seq === b.seq && a.n < b.n);
  }

  // ---- the API --------------------------------------------------------------

  function authHeaders(extra) {
    return { Authorization: `Bearer ${S.key}`, ...(extra || {}) };
  }

  async function failure(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    const error = (body && body.error) || {};
    return new ApiError(
      response.status,
      error.type || "",
      error.message || response.statusText,
      response.headers.get("Retry-After"),
    );
  }

  async function api(method, path, body, options) {
    const init = { method, headers: authHeaders(), signal: options && options.signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (!response.ok) {
      const err = await failure(response);
      if (response.status === 401) signOut("The API key is unknown or was revoked.");
      throw err;
    }
    if (response.status === 204) return null;
    return response.json();
  }

  const sessionPath = (id, rest) => `/v1/sessions/${encodeURIComponent(id)}${rest || ""}`;

  // Server-sent events from a fetch response (EventSource cannot send a key).
  async function* readEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let event = "";
    let data = [];
    let id = null;
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let start = 0;
      for (;;) {
        let end = -1;
        let next = -1;
        for (let i = start; i < buffer.length; i++) {
          const c = buffer.charCodeAt(i);
          if (c === 10) {
            end = i;
            next = i + 1;
            break;
          }
          if (c === 13) {
            if (i + 1 < buffer.length) {
              end = i;
              next = buffer.charCodeAt(i + 1) === 10 ? i + 2 : i + 1;
            } else if (done) {
              end = i;
              next = i + 1;
            }
            break; // a lone CR at the end: wait for what follows it
          }
        }
        if (end < 0) break;
        const line = buffer.slice(start, end);
        start = next;
        if (line === "") {
          if (data.length) {
            let parsed = null;
            try {
              parsed = JSON.parse(data.join("\n"));
            } catch (_) {
              parsed = { text: data.join("\n") };
            }
            yield { event: event || "message", id, data: parsed };
          }
          event = "";
          data = [];
          continue;
        }
        if (line.charCodeAt(0) === 58) continue; // ":" a comment (keep-alive)
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.charCodeAt(0) === 32) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
      buffer = buffer.slice(start);
      if (done) return;
    }
  }

  // ---- signing in -----------------------------------------------------------

  function showSignIn(message) {
    $("app-view").hidden = true;
    $("sign-out").hidden = true;
    $("who").hidden = true;
    $("sign-in-view").hidden = false;
    say("sign-in-error", message);
    $("api-key").focus();
  }

  function signOut(message) {
    stopWatch();
    S.gen += 1;
    S.key = null;
    S.current = null;
    S.sessions.clear();
    S.order = [];
    sessionStorage.removeItem(KEY);
    $("session-tree").replaceChildren();
    $("conversation").replaceChildren();
    showSignIn(message);
  }

  async function signIn(key) {
    S.key = key;
    try {
      await loadSessions(true);
    } catch (err) {
      if (S.key === null) return; // 401: signOut already ran
      S.key = null;
      sessionStorage.removeItem(KEY);
      showSignIn(describeError(err));
      return;
    }
    sessionStorage.setItem(KEY, key);
    $("sign-in-view").hidden = true;
    $("app-view").hidden = false;
    $("sign-out").hidden = false;
    const any = S.order.length ? S.sessions.get(S.order[0]) : null;
    const who = $("who");
    who.textContent = any && any.user_id ? `Signed in as ${any.user_id}` : "Signed in";
    who.hidden = false;
    const wanted = new URLSearchParams(location.hash.slice(1)).get("s");
    if (wanted) await openSession(wanted);
  }

  // ---- sessions and the tree of forks -------------------------------------

  async function loadSessions(reset) {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (!reset && S.nextCursor) params.set("cursor", S.nextCursor);
    const page = await api("GET", `/v1/sessions?${params}`);
    if (reset) {
      S.sessions.clear();
      S.order = [];
    }
    for (const session of page.sessions) {
      if (!S.sessions.has(session.session_id)) S.order.push(session.session_id);
      S.sessions.set(session.session_id, session);
    }
    S.nextCursor = page.next_cursor;
    renderTree();
  }

  function remember(session) {
    if (!S.sessions.has(session.session_id)) S.order.unshift(session.session_id);
    S.sessions.set(session.session_id, session);
    renderTree();
  }

  function renderTree() {
    const children = new Map();
    const roots = [];
    for (const id of S.order) {
      const session = S.sessions.get(id);
      const parent = session.parent && session.parent.session_id;
      if (parent && S.sessions.has(parent)) {
        if (!children.has(parent)) children.set(parent, []);
        children.get(parent).push(session);
      } else {
        roots.push(session);
      }
    }
    const item = (session, level) => {
      const id = session.session_id;
      const open = S.current && S.current.session_id === id;
      const meta = [];
      if (session.window_id) meta.push(`window ${session.window_id}`);
      if (session.parent) meta.push(`fork at #${session.parent.seq}`);
      if (session.state !== "active") meta.push(session.state);
      meta.push(when(session.created_at));
      const kids = children.get(id) || [];
      const li = h(
        "li",
        {
          role: "treeitem",
          "aria-level": level,
          "aria-selected": open ? "true" : "false",
          "aria-expanded": kids.length ? "true" : null,
          "data-session-id": id,
        },
        h(
          "button",
          { type: "button", class: open ? "session open" : "session", onclick: () => openSession(id) },
          h("span", { class: "name", text: sessionName(session) }),
          h("span", { class: "meta", text: meta.join(" · ") }),
        ),
      );
      if (kids.length) {
        li.append(h("ul", { role: "group" }, ...kids.map((kid) => item(kid, level + 1))));
      }
      return li;
    };
    $("session-tree").replaceChildren(...roots.map((session) => item(session, 1)));
    $("more-sessions").hidden = !S.nextCursor;
    say("sessions-status", S.order.length ? "" : "No sessions yet.");
  }

  async function newSession(body) {
    try {
      const session = await api("POST", "/v1/sessions", body || {});
      remember(session);
      await openSession(session.session_id);
    } catch (err) {
      say("chat-error", describeError(err));
    }
  }

  async function openWindow(windowId) {
    try {
      const session = await api("PUT", `/v1/windows/${encodeURIComponent(windowId)}`, {});
      remember(session);
      await openSession(session.session_id);
    } catch (err) {
      say("chat-error", describeError(err));
    }
  }

  // ---- the open session -----------------------------------------------------

  function setComposer(enabled) {
    $("message").disabled = !enabled;
    $("send").disabled = !enabled;
  }

  async function openSession(id) {
    stopWatch();
    S.gen += 1;
    const gen = S.gen;
    S.current = null;
    S.live = null;
    S.openTurnId = null;
    S.lastMessage = new Map(); // turn id -> seq of its last message
    S.turnEnd = new Map(); // turn id -> seq of its turn_end
    S.turnOf = new Map(); // seq -> turn id
    S.renderedSeq = 0;
    S.lastId = null;
    S.syncing = Promise.resolve();
    $("conversation").replaceChildren();
    $("checkpoints").replaceChildren();
    $("usage").replaceChildren();
    say("chat-error", "");
    say("turn-status", "");
    say("chat-title", "Loading…");
    say("chat-meta", "");
    setComposer(false);
    let session;
    try {
      session = await api("GET", sessionPath(id));
    } catch (err) {
      if (gen !== S.gen) return;
      say("chat-title", "No session open");
      say("chat-error", describeError(err));
      history.replaceState(null, "", location.pathname);
      return;
    }
    if (gen !== S.gen) return;
    S.current = session;
    S.parentSeq = session.parent ? session.parent.seq : 0;
    remember(session);
    history.replaceState(null, "", `#s=${encodeURIComponent(id)}`);
    say("chat-title", sessionName(session));
    const meta = [`id ${session.session_id}`, session.state];
    if (session.window_id) meta.push(`window ${session.window_id}`);
    if (session.parent) meta.push(`fork of ${shortId(session.parent.session_id)} at #${session.parent.seq}`);
    say("chat-meta", meta.join(" · "));
    let openTurn = false;
    try {
      openTurn = await loadHistory(gen);
    } catch (err) {
      if (gen === S.gen) say("chat-error", describeError(err));
      return;
    }
    if (gen !== S.gen) return;
    setComposer(session.state !== "archived");
    if (session.state === "archived") say("turn-status", "This session is archived (read-only).");
    // Where to resume the live stream: the last id this tab saw, if it still
    // describes the log as shown (the text since the last stored seq).
    S.lastId = String(S.renderedSeq);
    const saved = readLive(id);
    if (openTurn) {
      const seen = saved && parseId(saved.id);
      liveBubble();
      if (seen && seen.seq === S.renderedSeq) {
        S.lastId = saved.id;
        if (saved.seq === S.renderedSeq && saved.text) appendText(saved.text, saved.seq);
      }
      say("turn-status", "An answer is in progress…");
    } else {
      clearLive(id);
    }
    refreshDetails();
    startWatch(gen);
  }

  // Reads the log after what is shown; returns whether a turn is open.
  async function loadHistory(gen) {
    const events = [];
    let after = S.renderedSeq;
    for (;;) {
      const page = await api(
        "GET",
        sessionPath(S.current.session_id, `/history?after_seq=${after}&limit=${HISTORY_PAGE}`),
      );
      if (gen !== S.gen) return false;
      events.push(...page.events);
      if (page.next_after_seq === null || page.next_after_seq === undefined) break;
      after = page.next_after_seq;
    }
    renderEvents(events);
    return turnOpen();
  }

  function turnOpen() {
    return Boolean(S.openTurnId);
  }

  function renderEvents(events) {
    const log = $("conversation");
    const items = [];
    for (const event of events) {
      if (event.seq <= S.renderedSeq) continue;
      if (event.turn_id) {
        if (event.type === "message") S.lastMessage.set(event.turn_id, event.seq);
        if (event.type === "turn_end") S.turnEnd.set(event.turn_id, event.seq);
        S.turnOf.set(event.seq, event.turn_id);
      }
      if (event.seq > S.parentSeq) {
        if (event.type === "turn_start") S.openTurnId = event.turn_id || `#${event.seq}`;
        if (event.type === "turn_end") S.openTurnId = null;
      }
      const el = renderEvent(event);
      if (el) {
        if (event.seq <= S.parentSeq) el.classList.add("inherited");
        items.push(el);
      }
      if (S.parentSeq && event.seq === S.parentSeq) {
        items.push(
          h("p", {
            class: "divider",
            text: `Forked from ${shortId(S.current.parent.session_id)} here (#${S.parentSeq})`,
          }),
        );
      }
      S.renderedSeq = event.seq;
    }
    for (const el of log.querySelectorAll(".pending-user")) el.remove();
    log.append(...items);
    if (S.live) log.append(S.live.el); // keep the answer in progress last
    log.scrollTop = log.scrollHeight;
  }

  function messageText(content) {
    if (typeof content === "string") return content;
    if (!Array.isArray(content)) return "";
    return content
      .map((part) => (part && part.type === "text" ? part.text : part && part.type ? `[${part.type}]` : ""))
      .join("");
  }

  function messageActions(seq, label) {
    return h(
      "div",
      { class: "actions" },
      h("button", {
        type: "button",
        class: "link",
        "aria-label": `Fork from message ${seq}`,
        title: "A new session with the conversation up to here",
        text: "Fork here",
        onclick: () => forkAt(seq),
      }),
      h("button", {
        type: "button",
        class: "link",
        "aria-label": `Rewind to message ${seq}`,
        title: `The model's context back to this ${label}`,
        text: "Rewind here",
        onclick: () => rewindTo(seq),
      }),
    );
  }

  function renderEvent(event) {
    const data = event.data || {};
    switch (event.type) {
      case "message": {
        const role = data.role;
        if (role === "user" || role === "assistant") {
          const label = role === "user" ? "You" : "Assistant";
          const el = h(
            "article",
            { class: `msg ${role}`, "data-seq": event.seq, "aria-label": `${label} message ${event.seq}` },
            h("header", {}, h("span", { class: "who", text: label }), h("span", { class: "seq", text: `#${event.seq}` })),
          );
          const text = messageText(data.content);
          if (text) el.append(h("div", { class: "text", text }));
          for (const call of data.tool_calls || []) {
            el.append(h("div", { class: "tool-call", text: `Tool call: ${call.name}(${call.arguments || ""})` }));
          }
          if (data.partial) el.append(h("p", { class: "note", text: "(cut short)" }));
          if (data.truncated) el.append(h("p", { class: "note", text: "(stopped at the output limit)" }));
          el.append(messageActions(event.seq, "message"));
          return el;
        }
        if (role === "tool") {
          return h(
            "article",
            {
              class: data.is_error ? "msg tool error" : "msg tool",
              "data-seq": event.seq,
              "aria-label": `Tool result ${event.seq}`,
            },
            h("header", {}, h("span", { class: "who", text: `Tool ${data.name || ""}`.trim() }), h("span", { class: "seq", text: `#${event.seq}` })),
            h("div", { class: "text", text: messageText(data.content) }),
          );
        }
        return null; // system messages are not shown
      }
      case "reset":
        return h("p", { class: "divider", text: `Context cleared (#${event.seq})` });
      case "rewind":
        return h("p", {
          class: "divider",
          text: `Rewound to #${data.to_seq}${data.checkpoint ? ` (checkpoint ${data.checkpoint})` : ""}`,
        });
      case "checkpoint":
        return h("p", {
          class: "divider",
          text: data.deleted ? `Checkpoint ${data.name || ""} removed` : `Checkpoint ${data.name || `#${event.seq}`} (#${event.seq})`,
        });
      case "compaction":
        return h("p", { class: "divider", text: `Earlier messages summarised (up to #${data.upto_seq})` });
      case "lifecycle":
        return h("p", { class: "divider", text: `Session ${data.state}${data.reason ? `: ${data.reason}` : ""}` });
      case "turn_end":
        if (data.status && data.status !== "completed") {
          return h("p", {
            class: "divider warn",
            text: `Turn ${data.status}${data.error ? `: ${data.error}` : ""}`,
          });
        }
        return null;
      default:
        return null;
    }
  }

  // ---- an answer in progress ------------------------------------------------

  function readLive(id) {
    try {
      return JSON.parse(sessionStorage.getItem(LIVE + id) || "null");
    } catch (_) {
      return null;
    }
  }

  function clearLive(id) {
    sessionStorage.removeItem(LIVE + id);
  }

  function liveBubble() {
    if (S.live) return S.live;
    const el = h(
      "article",
      { class: "msg assistant live", "aria-label": "Answer in progress", "aria-busy": "true" },
      h("header", {}, h("span", { class: "who", text: "Assistant" }), h("span", { class: "seq", text: "…" })),
    );
    S.live = { el, seq: -1, text: "", textEl: null };
    $("conversation").append(el);
    return S.live;
  }

  function appendText(text, seq) {
    const live = liveBubble();
    if (live.seq !== seq) {
      live.seq = seq;
      live.text = "";
    }
    if (!live.textEl) {
      live.textEl = h("div", { class: "text" });
      live.el.append(live.textEl);
    }
    live.textEl.append(document.createTextNode(text));
    live.text += text;
    const log = $("conversation");
    log.scrollTop = log.scrollHeight;
  }

  function replaceText(text) {
    const live = liveBubble();
    if (!live.textEl) {
      live.textEl = h("div", { class: "text" });
      live.el.append(live.textEl);
    }
    live.textEl.textContent = text;
  }

  function appendLine(cls, text) {
    const live = liveBubble();
    live.textEl = null; // text after this starts a new paragraph
    live.el.append(h("div", { class: cls, text }));
  }

  // One event of the open session's live stream (POST stream or /events).
  async function onLiveEvent(ev, gen) {
    if (gen !== S.gen || !S.current) return;
    const id = parseId(ev.id);
    const last = parseId(S.lastId);
    if (ev.event !== "stop" && idBefore(id, last)) return; // seen already
    if (ev.event === "stop") {
      S.lastId = ev.id;
      await finishTurn(gen, ev.data);
      return;
    }
    if (!S.live) {
      if (!id || id.seq <= S.renderedSeq) return; // a turn already shown from the log
      // A turn this tab did not start (another window): show its message first.
      await sync(gen);
      if (gen !== S.gen) return;
      liveBubble();
      say("turn-status", "Answering (from another window)…");
    }
    if (!idBefore(id, parseId(S.lastId))) S.lastId = ev.id;
    const data = ev.data || {};
    // Already shown from the log: a stored event up to the last seq shown, a
    // delta of a model call whose message is shown.
    const stored = id && (id.n === 0 ? id.seq <= S.renderedSeq : id.seq < S.renderedSeq);
    switch (ev.event) {
      case "text":
        if (stored) break;
        if (data.replace) replaceText(data.text || "");
        else appendText(data.text || "", id ? id.seq : -1);
        if (id && id.n === 0) {
          // the rest of a stored message: no text is owed after that seq yet
          S.live.seq = id.seq;
          S.live.text = "";
        }
        break;
      case "tool_call":
        if (!stored) appendLine("tool-call", `Tool call: ${data.name}(${data.arguments || ""})`);
        break;
      case "tool_result":
        if (!stored) appendLine(data.is_error ? "tool-result error" : "tool-result", `Tool ${data.name}: ${data.content}`);
        break;
      case "error":
        appendLine("error", `Error: ${data.message || data.type}`);
        break;
      default:
        break; // usage: the details are read again at the end
    }
    if (S.live) {
      sessionStorage.setItem(
        LIVE + S.current.session_id,
        JSON.stringify({ id: ev.id, seq: S.live.seq, text: S.live.text }),
      );
    }
  }

  async function finishTurn(gen, stop) {
    if (gen !== S.gen || !S.current) return;
    if (S.live) {
      S.live.el.remove();
      S.live = null;
    }
    S.openTurnId = null;
    clearLive(S.current.session_id);
    await sync(gen);
    if (gen !== S.gen) return;
    if (stop && stop.reason) {
      say("turn-status", stop.reason === "end_turn" ? "Answer complete." : `Answer ended: ${stop.reason}.`);
    }
    refreshDetails();
  }

  // Show what the log holds past what is shown (one at a time).
  function sync(gen) {
    S.syncing = S.syncing
      .then(async () => {
        if (gen !== S.gen || !S.current) return;
        await loadHistory(gen);
        if (S.lastId === null || idBefore(parseId(S.lastId), { seq: S.renderedSeq, n: 0 })) {
          S.lastId = String(S.renderedSeq);
        }
      })
      .catch((err) => {
        if (gen === S.gen) say("chat-error", describeError(err));
      });
    return S.syncing;
  }

  // ---- the live-events stream (other windows, reloads) ---------------------

  function stopWatch() {
    if (S.watcher) {
      S.watcher.stopped = true;
      S.watcher.controller.abort();
      if (S.watcher.wake) S.watcher.wake();
      S.watcher = null;
    }
  }

  function kickWatch() {
    if (S.watcher && S.watcher.wake) S.watcher.wake();
  }

  function startWatch(gen) {
    stopWatch();
    if (S.eventsRoute === false || !S.current) return;
    const watcher = { stopped: false, controller: new AbortController(), wake: null };
    S.watcher = watcher;
    watchLoop(gen, watcher);
  }

  async function watchLoop(gen, watcher) {
    const id = S.current.session_id;
    let delay = 250;
    while (!watcher.stopped && gen === S.gen) {
      let sawEvents = false;
      try {
        const response = await fetch(sessionPath(id, "/events"), {
          headers: authHeaders({ Accept: "text/event-stream", "Last-Event-ID": S.lastId || String(S.renderedSeq) }),
          signal: watcher.controller.signal,
        });
        if (response.status === 404 || response.status === 405) {
          if (S.eventsRoute !== true) {
            // The session was just read: no such route on this server.
            S.eventsRoute = false;
            return;
          }
          say("chat-error", describeError(await failure(response)));
          return;
        }
        if (response.status === 401) {
          signOut("The API key is unknown or was revoked.");
          return;
        }
        if (response.ok) {
          S.eventsRoute = true;
          for await (const ev of readEvents(response)) {
            if (watcher.stopped || gen !== S.gen) return;
            sawEvents = true;
            if (ev.event === "reconnect") {
              // It fell behind: start again after the last event it sent.
              if (ev.data && ev.data.last_event_id) S.lastId = ev.data.last_event_id;
              break;
            }
            await onLiveEvent(ev, gen);
          }
        }
      } catch (err) {
        if (watcher.stopped || gen !== S.gen) return;
      }
      // Back off while the stream ends at once (no turn running).
      delay = sawEvents ? 100 : Math.min(delay * 2, 2000);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, delay);
        watcher.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      watcher.wake = null;
      if (watcher.controller.signal.aborted) return;
    }
  }

  // ---- sending --------------------------------------------------------------

  async function send(text) {
    if (!S.current || S.sending) return;
    const gen = S.gen;
    const id = S.current.session_id;
    S.sending = true;
    setComposer(false);
    say("chat-error", "");
    say("turn-status", "Answering…");
    const log = $("conversation");
    log.append(
      h(
        "article",
        { class: "msg user pending-user", "aria-label": "Your message (sending)" },
        h("header", {}, h("span", { class: "who", text: "You" })),
        h("div", { class: "text", text }),
      ),
    );
    liveBubble();
    try {
      if (S.eventsRoute === true && S.watcher) {
        // The turn runs on the server whatever happens to this page; the
        // answer is shown from the live-events stream.
        setTimeout(kickWatch, 50);
        const reply = await api("POST", sessionPath(id, "/messages"), { message: text, stream: false });
        await finishTurn(gen, { reason: reply.stop_reason });
      } else {
        stopWatch();
        const response = await fetch(sessionPath(id, "/messages"), {
          method: "POST",
          headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
          body: JSON.stringify({ message: text, stream: true }),
        });
        if (!response.ok) {
          const err = await failure(response);
          if (response.status === 401) signOut("The API key is unknown or was revoked.");
          throw err;
        }
        let stopped = false;
        for await (const ev of readEvents(response)) {
          if (ev.event === "stop") stopped = true;
          await onLiveEvent(ev, gen);
        }
        if (!stopped) await finishTurn(gen, null);
        if (gen === S.gen) startWatch(gen);
      }
    } catch (err) {
      if (gen === S.gen) {
        say("chat-error", describeError(err));
        say("turn-status", "");
        for (const el of log.querySelectorAll(".pending-user")) el.remove();
        await finishTurn(gen, null);
        if (!S.watcher) startWatch(gen);
      }
    } finally {
      S.sending = false;
      if (gen === S.gen && S.current) setComposer(S.current.state !== "archived");
    }
  }

  // ---- fork, rewind, checkpoints, usage, context --------------------------

  // Forking from a turn's last message forks at its turn_end, so the fork
  // starts with that turn closed (not interrupted).
  function forkPoint(seq) {
    const turn = S.turnOf.get(seq);
    if (turn && S.lastMessage.get(turn) === seq && S.turnEnd.has(turn)) return S.turnEnd.get(turn);
    return seq;
  }

  async function forkAt(seq) {
    if (!S.current) return;
    try {
      const fork = await api("POST", sessionPath(S.current.session_id, "/fork"), { at: forkPoint(seq) });
      remember(fork);
      await openSession(fork.session_id);
      say("turn-status", `Forked at message ${seq}.`);
    } catch (err) {
      say("chat-error", describeError(err));
    }
  }

  async function rewindTo(target) {
    if (!S.current) return;
    const gen = S.gen;
    try {
      const result = await api("POST", sessionPath(S.current.session_id, "/rewind"), { to: target });
      say("turn-status", `Rewound: the model's context now ends at #${result.seq}.`);
      await sync(gen);
      refreshDetails();
    } catch (err) {
      say("chat-error", describeError(err));
    }
  }

  async function saveCheckpoint(name) {
    if (!S.current) return;
    const gen = S.gen;
    try {
      await api("POST", sessionPath(S.current.session_id, "/checkpoints"), { name });
      await sync(gen);
      refreshDetails();
    } catch (err) {
      say("chat-error", describeError(err));
    }
  }

  async function deleteCheckpoint(checkpointId) {
    if (!S.current) return;
    try {
      await api("DELETE", sessionPath(S.current.session_id, `/checkpoints/${encodeURIComponent(checkpointId)}`));
      refreshDetails();
    } catch (err) {
      say("chat-error", describeError(err));
    }
  }

  function refreshDetails() {
    if (!S.current) return;
    const gen = S.gen;
    const id = S.current.session_id;
    const keep = (fn) => (value) => {
      if (gen === S.gen) fn(value);
    };
    api("GET", sessionPath(id, "/usage")).then(keep(renderUsage)).catch(() => {});
    api("GET", sessionPath(id, "/context")).then(keep(renderContext)).catch(() => {});
    api("GET", sessionPath(id, "/checkpoints")).then(keep(renderCheckpoints)).catch(() => {});
  }

  function renderUsage(usage) {
    const rows = [
      ["Total tokens", usage.total_tokens],
      ["Prompt tokens", usage.total_prompt_tokens],
      ["Completion tokens", usage.total_completion_tokens],
      ["Model calls", usage.calls],
      ["Cost", `$${Number(usage.total_cost || 0).toFixed(4)}${usage.estimated ? " (estimated)" : ""}`],
    ];
    if (usage.inherited && usage.inherited.calls) {
      rows.push(["Inherited (fork)", `${usage.inherited.total_tokens} tokens`]);
    }
    $("usage").replaceChildren(
      ...rows.flatMap(([name, value]) => [h("dt", { text: name }), h("dd", { text: String(value) })]),
    );
  }

  function renderContext(info) {
    const meter = $("context-meter");
    meter.value = Math.min(1, info.utilisation || 0);
    const percent = ((info.utilisation || 0) * 100).toFixed(1);
    const text = `${info.current_tokens} of ${info.budget_tokens} tokens (${percent}%), ${info.messages} messages${info.estimated ? ", estimated" : ""}`;
    meter.setAttribute("aria-valuetext", text);
    say("context-text", text);
  }

  function renderCheckpoints(list) {
    const items = list.checkpoints.map((cp) =>
      h(
        "li",
        {},
        h("span", { class: "name", text: `${cp.checkpoint_id} (#${cp.seq})` }),
        h("button", {
          type: "button",
          text: "Rewind",
          "aria-label": `Rewind to checkpoint ${cp.checkpoint_id}`,
          onclick: () => rewindTo(cp.checkpoint_id),
        }),
        h("button", {
          type: "button",
          class: "link",
          text: "Remove",
          "aria-label": `Remove checkpoint ${cp.checkpoint_id}`,
          onclick: () => deleteCheckpoint(cp.checkpoint_id),
        }),
      ),
    );
    $("checkpoints").replaceChildren(...items);
  }

  // ---- wiring ---------------------------------------------------------------

  function wire() {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      $("api-key").value = "";
      if (key) signIn(key);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("new-session").addEventListener("click", () => newSession({}));
    $("more-sessions").addEventListener("click", () =>
      loadSessions(false).catch((err) => say("sessions-status", describeError(err))),
    );
    $("window-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const windowId = $("window-id").value.trim();
      if (windowId) openWindow(windowId);
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("message").value;
      if (!text.trim()) return;
      $("message").value = "";
      send(text);
    });
    $("message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("checkpoint-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("checkpoint-name").value.trim();
      $("checkpoint-name").value = "";
      if (name) saveCheckpoint(name);
    });
    window.addEventListener("hashchange", () => {
      const wanted = new URLSearchParams(location.hash.slice(1)).get("s");
      if (S.key && wanted && (!S.current || S.current.session_id !== wanted)) openSession(wanted);
    });
    const key = sessionStorage.getItem(KEY);
    if (key) signIn(key);
    else showSignIn("");
  }

  wire();
})();
