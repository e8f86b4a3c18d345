// agentbus web chat: plain JavaScript, no build step.
//
// Everything the page shows comes from one server-sent event stream per session
// (`/v1/workspaces/{ws}/sessions/{sid}/events?include=runs`): the session's messages, each run
// it assigns (transitions, approvals) and the runs' live output. Rendering is keyed by ids
// (message id, run id, delta attempt and sequence), so a replay after a reconnect or a
// `reset` never shows anything twice. Commands go through the HTTP API.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const T = {
    opened: "agentbus.session.opened.v1",
    closed: "agentbus.session.closed.v1",
    received: "agentbus.session.message_received.v1",
    sent: "agentbus.session.message_sent.v1",
    assigned: "agentbus.session.run_assigned.v1",
    enqueued: "agentbus.session.run_enqueued.v1",
    released: "agentbus.session.run_released.v1",
    queued: "agentbus.run.queued.v1",
    started: "agentbus.run.started.v1",
    waiting: "agentbus.run.waiting_approval.v1",
    resumed: "agentbus.run.resumed.v1",
    succeeded: "agentbus.run.succeeded.v1",
    failed: "agentbus.run.failed.v1",
    retry: "agentbus.run.retry_scheduled.v1",
    cancelled: "agentbus.run.cancelled.v1",
    timedOut: "agentbus.run.timed_out.v1",
    delta: "agentbus.run.delta.v1",
  };
  const RUN_LABELS = {
    queued: "queued",
    running: "running",
    waiting_approval: "waiting for approval",
    retrying: "retrying",
    succeeded: "done",
    failed: "failed",
    cancelled: "cancelled",
    timed_out: "timed out",
  };

  const SYSTEM_AUTHOR = "agentbus";

  const state = {
    me: null,
    ws: null,
    role: null,
    agents: [],
    sid: null,
    source: null,
    lastId: null,
    retryTimer: null,
    retryDelay: 1000,
    sessionsCursor: null,
    messages: new Map(), // message id -> <li>
    runs: new Map(), // run id -> {li, text, attempt, seq, final, state}
    closed: false,
    agent: null,
  };

  // ------------------------------------------------------------------ HTTP

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(method, path, body, headers = {}) {
    let response;
    try {
      response = await fetch(path, {
        method,
        credentials: "same-origin",
        headers: body === undefined ? headers : { "content-type": "application/json", ...headers },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      throw new ApiError(0, "The server cannot be reached: check your connection.");
    }
    if (response.status === 204) return null;
    const text = await response.text();
    let payload = null;
    try {
      payload = text ? JSON.parse(text) : null;
    } catch (error) {
      payload = null;
    }
    if (!response.ok) {
      const detail = (payload && (payload.detail || payload.title)) || `HTTP ${response.status}`;
      throw new ApiError(response.status, detail);
    }
    return payload;
  }

  const wsPath = (rest) => `/v1/workspaces/${encodeURIComponent(state.ws)}${rest}`;

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ------------------------------------------------------------------ status line

  let statusTimer = null;
  function status(text, kind = "warn", hideAfter = 0) {
    const box = $("status");
    clearTimeout(statusTimer);
    if (!text) {
      box.hidden = true;
      return;
    }
    box.textContent = text;
    box.dataset.kind = kind;
    box.hidden = false;
    if (hideAfter) statusTimer = setTimeout(() => (box.hidden = true), hideAfter);
  }

  function connection(stateName) {
    const dot = $("connection");
    dot.dataset.state = stateName;
    const labels = {
      live: "Live",
      connecting: "Reconnecting…",
      offline: "Offline",
      idle: "Not connected",
    };
    dot.title = labels[stateName] || stateName;
    dot.setAttribute("aria-label", dot.title);
  }

  // ------------------------------------------------------------------ log in

  function showLogin(message = "") {
    closeStream();
    $("chat-view").hidden = true;
    $("login-view").hidden = false;
    $("login-error").textContent = message;
    $("login-workspace").value = state.ws || "demo";
    (state.me ? $("login-workspace") : $("login-user")).focus();
  }

  async function onLogin(event) {
    event.preventDefault();
    const user = $("login-user").value.trim();
    const password = $("login-password").value;
    const ws = $("login-workspace").value.trim();
    const error = $("login-error");
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(ws)) {
      error.textContent = "A workspace id has letters, digits, - and _ only.";
      return;
    }
    const button = event.submitter || $("login-form").querySelector("button[type=submit]");
    button.disabled = true;
    error.textContent = "";
    try {
      if (!state.me || user) {
        if (!user || !password) {
          error.textContent = "Enter your user and password.";
          return;
        }
        await api("POST", "/v1/auth/login", { user, password });
        state.me = await api("GET", "/v1/me");
      }
      $("login-password").value = "";
      await enterWorkspace(ws);
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  }

  async function logout() {
    closeStream();
    try {
      await api("POST", "/v1/auth/logout");
    } catch (e) {
      /* the cookie is dropped by the server; offline is fine */
    }
    state.me = null;
    showLogin("You are logged out.");
  }

  // ------------------------------------------------------------------ workspace and sessions

  async function enterWorkspace(ws) {
    let info;
    try {
      info = await api("GET", `/v1/workspaces/${encodeURIComponent(ws)}`);
    } catch (e) {
      if (e.status === 401) return showLogin("Your login expired: log in again.");
      if (e.status === 404) {
        return showLogin(`Workspace “${ws}” does not exist or you are not a member of it.`);
      }
      throw e;
    }
    state.ws = ws;
    state.role = info.your_role;
    state.agents = info.agents || [];
    localStorage.setItem("agentbus.ws", ws);
    $("login-view").hidden = true;
    $("chat-view").hidden = false;
    $("whoami").textContent = `${state.me.id} · ${ws} (${state.role})`;
    const select = $("new-agent");
    select.replaceChildren(
      ...state.agents.map((name) => Object.assign(document.createElement("option"), {
        value: name,
        textContent: `agent: ${name}`,
      })),
    );
    const canWrite = state.role !== "viewer" && state.role !== "auditor";
    $("new-session").hidden = !canWrite || state.agents.length === 0;
    await loadSessions();
    const wanted = new URLSearchParams(location.hash.slice(1)).get("s");
    if (wanted) openSession(wanted);
    else if (window.matchMedia("(max-width: 759px)").matches) toggleSessions(true);
  }

  async function loadSessions(more = false, minPosition = null) {
    let query = "?limit=30";
    if (more && state.sessionsCursor) query += `&cursor=${encodeURIComponent(state.sessionsCursor)}`;
    if (minPosition) query += `&min_position=${minPosition}`;
    const page = await api("GET", wsPath(`/sessions${query}`));
    const list = $("session-list");
    if (!more) list.replaceChildren();
    for (const session of page.sessions) list.append(sessionItem(session));
    state.sessionsCursor = page.next_cursor;
    $("more-sessions").hidden = !page.next_cursor;
    markCurrent();
  }

  function sessionItem(session) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.sid = session.id;
    button.textContent = session.title || `Chat ${session.id.slice(-6)}`;
    const small = document.createElement("small");
    const when = session.last_message_at || session.created_at;
    small.textContent =
      `${session.message_count} message${session.message_count === 1 ? "" : "s"} · ` +
      `${new Date(when).toLocaleString()}${session.status === "closed" ? " · closed" : ""}`;
    button.append(small);
    button.addEventListener("click", () => openSession(session.id, button.firstChild.textContent));
    li.append(button);
    return li;
  }

  function markCurrent() {
    for (const button of $("session-list").querySelectorAll("button")) {
      button.setAttribute("aria-current", String(button.dataset.sid === state.sid));
    }
  }

  async function onNewSession(event) {
    event.preventDefault();
    const button = $("new-session").querySelector("button");
    button.disabled = true;
    try {
      const title = $("new-title").value.trim() || null;
      const agent = $("new-agent").value || null;
      const done = await api("POST", wsPath("/sessions"), { channel: "web", title, agent });
      $("new-title").value = "";
      await loadSessions(false, done.position);
      openSession(done.id, title);
    } catch (e) {
      status(e.message, "error", 6000);
    } finally {
      button.disabled = false;
    }
  }

  function toggleSessions(show) {
    const chat = $("chat-view");
    const visible = show ?? !chat.classList.contains("show-sessions");
    chat.classList.toggle("show-sessions", visible);
    $("sessions-toggle").setAttribute("aria-expanded", String(visible));
  }

  // ------------------------------------------------------------------ one session

  function openSession(sid, title) {
    closeStream();
    state.sid = sid;
    state.lastId = null;
    state.closed = false;
    clearConversation();
    history.replaceState(null, "", `#s=${encodeURIComponent(sid)}`);
    const listed = $("session-list").querySelector(`button[data-sid="${CSS.escape(sid)}"]`);
    $("session-title").textContent =
      title || (listed && listed.firstChild.textContent) || `Chat ${sid.slice(-6)}`;
    $("empty").hidden = true;
    $("messages").hidden = false;
    $("composer").hidden = false;
    $("composer-text").disabled = false;
    $("send").disabled = false;
    markCurrent();
    toggleSessions(false);
    connect();
    $("composer-text").focus();
  }

  function clearConversation() {
    state.messages = new Map();
    state.runs = new Map();
    approvals.clear();
    $("messages").replaceChildren();
    $("run-status").hidden = true;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    let url = wsPath(`/sessions/${encodeURIComponent(state.sid)}/events?include=runs`);
    if (state.lastId) url += `&last_event_id=${encodeURIComponent(state.lastId)}`;
    const source = new EventSource(url, { withCredentials: true });
    state.source = source;
    connection("connecting");
    source.onopen = () => {
      if (state.source !== source) return;
      state.retryDelay = 1000;
      connection("live");
      status("");
    };
    source.onerror = () => {
      if (state.source !== source) return;
      if (!navigator.onLine) {
        connection("offline");
        status("You are offline: the chat resumes where it stopped when you are back.");
      } else {
        connection("connecting");
        status("Connection lost: reconnecting…");
      }
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, e.g. a gateway restarting behind a proxy):
        // retry ourselves, from the last event received, and check we are still logged in.
        source.close();
        state.retryTimer = setTimeout(retry, state.retryDelay);
        state.retryDelay = Math.min(state.retryDelay * 2, 15000);
      }
    };
    for (const type of Object.values(T)) {
      source.addEventListener(type, (event) => receive(source, event));
    }
    source.addEventListener("reset", (event) => {
      if (state.source !== source) return;
      // The cursor can no longer be resumed (history older than retention, or the stream was
      // re-created): start again from what the server has, and say so.
      state.lastId = event.lastEventId || null;
      clearConversation();
      notice("The history was reset by the server: showing it again from the start.");
      status("History reset: reloaded from the server.", "info", 6000);
    });
  }

  async function retry() {
    if (!state.sid) return;
    try {
      await api("GET", "/v1/me");
    } catch (e) {
      if (e.status === 401) return showLogin("Your login expired: log in again.");
    }
    connect();
  }

  function closeStream() {
    clearTimeout(state.retryTimer);
    if (state.source) state.source.close();
    state.source = null;
    connection("idle");
  }

  function receive(source, event) {
    if (state.source !== source) return;
    state.lastId = event.lastEventId || state.lastId;
    let cloudEvent;
    try {
      cloudEvent = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    const data = cloudEvent.data || {};
    const runId = cloudEvent.subject && cloudEvent.subject.startsWith("run/")
      ? cloudEvent.subject.slice(4)
      : data.run_id;
    switch (event.type) {
      case T.opened:
        state.agent = data.agent || null;
        break;
      case T.received:
        message(data.message_id, "in", data.author, data.text, cloudEvent.time);
        break;
      case T.sent:
        message(data.message_id, "out", data.author, data.text, cloudEvent.time, data.run_id);
        break;
      case T.assigned:
      case T.enqueued:
        run(data.run_id);
        break;
      case T.closed:
        state.closed = true;
        notice(`This session was closed${data.reason ? `: ${data.reason}` : ""}.`);
        $("composer-text").disabled = true;
        $("send").disabled = true;
        break;
      case T.queued:
        runState(runId, "queued");
        break;
      case T.started:
        startAttempt(runId, data.attempt);
        runState(runId, "running");
        break;
      case T.delta:
        delta(runId, data);
        break;
      case T.waiting:
        runState(runId, "waiting_approval");
        approval(runId, data);
        break;
      case T.resumed:
        runState(runId, "running");
        decided(data.approval_id, data.decision);
        break;
      case T.retry:
        runState(runId, "retrying");
        break;
      case T.succeeded:
        runState(runId, "succeeded");
        finish(runId, data.output);
        break;
      case T.failed:
        runState(runId, "failed");
        if (!data.retryable) finish(runId, null, `The run failed: ${data.message}`);
        break;
      case T.cancelled:
        runState(runId, "cancelled");
        finish(runId, null, `The run was cancelled${data.reason ? `: ${data.reason}` : ""}.`);
        break;
      case T.timedOut:
        runState(runId, "timed_out");
        finish(runId, null, "The run timed out.");
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------ rendering

  function atBottom() {
    const list = $("messages");
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function append(li) {
    const follow = atBottom();
    $("messages").append(li);
    if (follow) li.scrollIntoView({ block: "end" });
  }

  function bubble(direction, author, time) {
    const li = document.createElement("li");
    li.className = `message ${direction}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "author";
    who.textContent = direction === "in" && state.me && author === state.me.id ? "you" : author;
    const when = document.createElement("time");
    if (time) {
      when.dateTime = time;
      when.textContent = new Date(time).toLocaleTimeString();
    }
    meta.append(who, when);
    const text = document.createElement("div");
    text.className = "text";
    li.append(meta, text);
    return li;
  }

  function message(id, direction, author, text, time, runId) {
    if (state.messages.has(id)) return;
    // A run's reply replaces what it streamed; agentbus's own notices (author `agentbus`, e.g.
    // "approval needed") stand apart even when they name a run.
    const current = runId && author !== SYSTEM_AUTHOR ? state.runs.get(runId) : null;
    let li;
    if (current) {
      // The reply of a run shown streaming: the stored message replaces what streamed.
      li = current.li;
      current.final = true;
      li.classList.remove("streaming");
      li.querySelector(".author").textContent = author;
    } else {
      li = bubble(direction, author, time);
      if (author === SYSTEM_AUTHOR) li.classList.add("system");
      append(li);
    }
    li.dataset.messageId = id;
    li.querySelector(".text").textContent = text;
    state.messages.set(id, li);
    listed(time);
  }

  // The open session's line in the list follows what the stream shows (the list itself is
  // as of when it was loaded).
  function listed(time) {
    const button = $("session-list").querySelector(`button[data-sid="${CSS.escape(state.sid)}"]`);
    const small = button && button.querySelector("small");
    if (!small) return;
    const count = state.messages.size;
    const when = time ? new Date(time).toLocaleString() : "";
    small.textContent = `${count} message${count === 1 ? "" : "s"}${when ? ` · ${when}` : ""}`;
  }

  function run(runId) {
    if (!runId) return null;
    let current = state.runs.get(runId);
    if (!current) {
      const li = bubble("out", state.agent || "agent", null);
      li.classList.add("streaming");
      li.dataset.runId = runId;
      const chip = document.createElement("span");
      chip.className = "chip";
      li.querySelector(".meta").append(chip);
      append(li);
      current = { li, chip, attempt: 0, seq: 0, final: false, text: "" };
      state.runs.set(runId, current);
    }
    return current;
  }

  function runState(runId, name) {
    const current = run(runId);
    if (!current) return;
    current.state = name;
    current.chip.dataset.state = name;
    current.chip.textContent = RUN_LABELS[name] || name;
    const top = $("run-status");
    top.hidden = false;
    top.dataset.state = name;
    top.textContent = `run: ${RUN_LABELS[name] || name}`;
  }

  function startAttempt(runId, attempt) {
    const current = run(runId);
    if (!current || attempt <= current.attempt) return;
    current.attempt = attempt;
    current.seq = 0;
    current.text = "";
    if (!current.final) current.li.querySelector(".text").textContent = "";
  }

  // Live output may still arrive after the stored reply (they are separate sources of the
  // stream, interleaved as they come, e.g. while catching up after a reconnect): it is kept
  // in `data-streamed` but the stored reply stays what is shown.
  function delta(runId, data) {
    const current = run(runId);
    if (!current || data.type !== "delta") return;
    if (data.attempt > current.attempt) startAttempt(runId, data.attempt);
    if (data.attempt < current.attempt || data.seq <= current.seq) return; // seen already
    current.seq = data.seq;
    current.text += data.text;
    current.li.dataset.streamed = current.text;
    if (current.final) return;
    const follow = atBottom();
    current.li.querySelector(".text").textContent = current.text;
    if (follow) current.li.scrollIntoView({ block: "end" });
  }

  function finish(runId, output, problem) {
    const current = run(runId);
    if (!current) return;
    current.li.classList.remove("streaming");
    if (current.final) return;
    if (problem && !current.text) current.li.querySelector(".text").textContent = problem;
    else if (problem) notice(problem);
  }

  function notice(text) {
    const li = document.createElement("li");
    li.className = "notice";
    li.textContent = text;
    append(li);
  }

  // ------------------------------------------------------------------ approvals

  const approvals = new Map(); // approval id -> card

  function approval(runId, data) {
    const current = run(runId);
    if (!current || approvals.has(data.approval_id)) return;
    const card = $("approval-template").content.firstElementChild.cloneNode(true);
    const label = `approval-${data.approval_id}`;
    card.setAttribute("aria-labelledby", label);
    const text = card.querySelector(".approval-text");
    text.id = label;
    text.textContent =
      `The agent asks to call the tool “${data.tool}”${data.reason ? ` (${data.reason})` : ""}.`;
    const reason = card.querySelector(".approval-reason");
    reason.id = `${label}-reason`;
    card.querySelector("label").htmlFor = reason.id;
    const approve = card.querySelector(".approve");
    const deny = card.querySelector(".deny");
    approve.setAttribute("aria-label", `Approve ${data.tool}`);
    deny.setAttribute("aria-label", `Deny ${data.tool}`);
    approve.addEventListener("click", () => decide(data.approval_id, "granted", card));
    deny.addEventListener("click", () => decide(data.approval_id, "denied", card));
    if (state.role === "viewer" || state.role === "auditor") {
      approve.disabled = true;
      deny.disabled = true;
    }
    approvals.set(data.approval_id, card);
    current.li.append(card);
    if (atBottom()) card.scrollIntoView({ block: "end" });
  }

  async function decide(approvalId, decision, card) {
    const buttons = card.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    const reason = card.querySelector(".approval-reason").value.trim() || null;
    try {
      const done = await api("POST", wsPath(`/approvals/${encodeURIComponent(approvalId)}/decide`), {
        decision,
        reason,
      });
      decided(approvalId, done.decision, done.by);
    } catch (e) {
      card.querySelector(".approval-outcome").textContent = e.message;
      if (e.status !== 409 && e.status !== 410) buttons.forEach((b) => (b.disabled = false));
    }
  }

  function decided(approvalId, decision, by) {
    const card = approvals.get(approvalId);
    if (!card || card.dataset.decision) return; // the first answer (API or stream) tells
    card.querySelectorAll("button, input").forEach((element) => (element.disabled = true));
    card.querySelector(".approval-actions").hidden = true;
    card.querySelector(".approval-reason").hidden = true;
    const words = { granted: "Approved", denied: "Denied", expired: "Expired" };
    card.querySelector(".approval-outcome").textContent =
      `${words[decision] || decision}${by ? ` by ${by}` : ""}.`;
    card.dataset.decision = decision;
  }

  // ------------------------------------------------------------------ sending

  async function onSend(event) {
    event.preventDefault();
    const box = $("composer-text");
    const text = box.value.trim();
    if (!text || state.closed) return;
    const button = $("send");
    button.disabled = true;
    $("composer-error").textContent = "";
    // One key per message: a retry after a lost answer posts it once, never twice.
    const key = randomKey();
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          await api("POST", wsPath(`/sessions/${encodeURIComponent(state.sid)}/messages`), { text }, {
            "idempotency-key": key,
          });
          break;
        } catch (e) {
          if (e.status !== 0 && e.status < 500) throw e;
          if (attempt >= 4) throw e;
          status("Sending failed: retrying…");
          await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
        }
      }
      box.value = "";
      status("");
    } catch (e) {
      if (e.status === 401) return showLogin("Your login expired: log in again.");
      $("composer-error").textContent = `Not sent: ${e.message}`;
    } finally {
      button.disabled = state.closed;
      box.focus();
    }
  }

  // ------------------------------------------------------------------ start

  function wire() {
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", logout);
    $("new-session").addEventListener("submit", onNewSession);
    $("composer").addEventListener("submit", onSend);
    $("more-sessions").addEventListener("click", () => loadSessions(true));
    $("sessions-toggle").addEventListener("click", () => toggleSessions());
    $("composer-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    window.addEventListener("offline", () => {
      connection("offline");
      status("You are offline: the chat resumes where it stopped when you are back.");
    });
    window.addEventListener("online", () => {
      status("Back online: catching up…", "info", 3000);
      if (state.sid && (!state.source || state.source.readyState === EventSource.CLOSED)) connect();
    });
  }

  async function boot() {
    wire();
    const params = new URLSearchParams(location.search);
    state.ws = params.get("ws") || localStorage.getItem("agentbus.ws") || "demo";
    try {
      state.me = await api("GET", "/v1/me");
    } catch (e) {
      return showLogin(e.status === 401 ? "" : e.message);
    }
    if (state.me.kind !== "user") return showLogin("Log in with a user and password.");
    try {
      await enterWorkspace(state.ws);
    } catch (e) {
      showLogin(e.message);
    }
  }

  boot();
})();
