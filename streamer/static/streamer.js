/*
 * streamer.js: live task progress from a streamer server, over WebSocket or Server-Sent Events
 * (or long polling, for proxies that buffer even SSE: transport "poll"). "auto" starts on
 * WebSocket, moves to SSE when the upgrade fails twice, and to long polling when the event
 * stream brings nothing (not even its snapshot) for 12 s, both while the server answers HTTP.
 * Plain browser JavaScript, no build step, no dependencies; exposes window.Streamer.
 *
 *   const board = new Streamer.TaskBoard(document.getElementById("tasks"));
 *   const stream = new Streamer.TaskStream({
 *     url: location.origin, token, transport: "auto",  // or "websocket" / "sse" / "poll"
 *     onEvent: (msg) => board.handle(msg),
 *     onStatus: (text, state) => console.log(state, text),
 *   });
 *   stream.start();
 *
 * One connection per page carries every task of the user. Every message that carries an opaque
 * `id` (task events, and every `active_tasks` snapshot) moves the resume point: the stream
 * resumes from the last one after a reconnect, so nothing is missed, even by a connection that
 * dropped before its first task event.
 *
 * Commands return Promises of the same replies on every transport: over the open WebSocket
 * they are sent on it, otherwise (SSE, or a WebSocket that is reconnecting) they go to the
 * HTTP endpoints /api/tasks/..., with the same credentials.
 *
 *   const reply = await stream.getTaskStatus("report-7");  // {type: "task_status", task_id, status}
 *   const done = await stream.cancelTask("report-7");      // {type: "task_cancelled", task_id, success}
 *   const all = await stream.getActiveTasks();             // {type: "active_tasks", tasks, ...}
 *
 * A refused command rejects with a Streamer.CommandError carrying the server's `code`
 * ("rate_limited", "broker_unavailable", "unauthorized", "invalid_task_id", ...).
 *
 * Tokens that expire: pass `getToken`, a function returning a fresh token (or a Promise of
 * one). It is called shortly before the current token's `exp` (read from the JWT payload) and
 * when the server refuses the token; the stream reconnects with the new token and resumes from
 * the last id. At most one attempt per refusal: when getToken gives nothing (null, undefined,
 * throws) or its token is refused too, the stream stops with state "unauthorized".
 *
 * One connection per browser: with `shareConnection` (the default) the tabs of one user elect
 * a leader with the Web Locks API; only it connects, and it relays events and states to the
 * others over a BroadcastChannel. When it closes, another tab takes over and resumes from the
 * last id it saw. Commands from the other tabs go over HTTP. `shareConnection: false` opts out.
 */
(function (global) {
  "use strict";

  const FIRST_DELAY_MS = 500;
  // How long "auto" waits for an event stream's first message before it falls back to long
  // polling (the server sends its snapshot at once; heartbeats come every 15 s by default).
  // Longer than a server waits for its broker (10 s in all) before it refuses a stream: a
  // snapshot held up by a stalled Redis ends in a refusal, not in long polling for good.
  const SSE_FIRST_MESSAGE_MS = 12000;
  // How long a long poll may go unanswered (the server answers within its poll timeout, 25 s
  // by default) before the connection is taken for dead (a NAT entry dropped, a laptop that
  // slept) and a new poll is made.
  const POLL_ANSWER_MS = 60000;
  // WebSocket and event stream ask for their heartbeats as messages (`?heartbeat=event`:
  // JavaScript sees no ping and no SSE comment), the first right after the opening; one
  // silent for this many of their intervals, plus a margin, is taken for dead (a NAT entry
  // dropped, a laptop that slept: the browser itself may not notice for many minutes).
  const HEARTBEATS_MISSED = 3;
  // Until the first heartbeat tells the interval (it comes right after the opening, which
  // a server gives 10 s): time enough for the opening and a round of the default intervals.
  const FIRST_HEARTBEAT_MS = 120000;
  const HEARTBEAT_MARGIN_MS = 2000;
  const MAX_DELAY_MS = 10000;
  // How long the check whether a failed stream was refused for its credentials may take.
  const REFUSAL_CHECK_MS = 5000;
  const CLOSE_UNAUTHORIZED = 4401;
  const WEBSOCKET_FAILURES_BEFORE_SSE = 2;
  // A connection counts as working once it stayed open this long: only then does the backoff
  // start over, and a WebSocket cut off sooner (a proxy's idle timeout) counts as a failure.
  const STABLE_AFTER_MS = 5000;
  const CLOSE_ABNORMAL = 1006;
  // How the server refuses a stream for now: too many streams or openings (its own code),
  // or try again later and going away with its own reasons (a proxy may send those codes
  // too). Its close frame came through every proxy on the way.
  const CLOSE_TOO_MANY = 4029;
  const SERVER_REFUSAL_REASONS = {
    1001: new Set(["server shutting down"]),
    1013: new Set(["broker unavailable", "auth service unavailable"]),
  };
  const SEEN_IDS_KEPT = 1000; // relayed event ids remembered, to drop one relayed twice
  const SSE_EVENTS = ["active_tasks", "task_progress", "task_completed"];
  const TERMINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
  const COMMAND_TIMEOUT_MS = 15000;
  // What the server answers each command with (anything else: an error).
  const REPLY_TYPES = {
    ping: "pong",
    get_task_status: "task_status",
    get_active_tasks: "active_tasks",
    cancel_task: "task_cancelled",
  };
  const REFRESH_BEFORE_EXP_MS = 30000; // at most this long before `exp` (half the lifetime if less)

  /** A command the server refused (or that got no answer); `code` says why. */
  class CommandError extends Error {
    constructor(code, message, status) {
      super(message || code);
      this.name = "CommandError";
      this.code = code;
      /** The HTTP status when the command went over HTTP, else null. */
      this.status = status === undefined ? null : status;
    }
  }

  /**
   * One live connection (WebSocket or SSE) that reconnects with backoff and resumes.
   *
   * onStatus(text, state) reports state changes; state is one of
   * "connecting", "connected", "reconnecting", "unauthorized", "stopped".
   */
  class TaskStream {
    constructor(options) {
      const opts = options || {};
      const transport = opts.transport || "auto";
      if (!["auto", "websocket", "sse", "poll"].includes(transport)) {
        throw new Error(`transport must be "auto", "websocket", "sse" or "poll", got ${transport}`);
      }
      this.url = opts.url || global.location.origin;
      this.token = opts.token || null;
      this.taskId = opts.taskId || null;
      this.requestedTransport = transport;
      this.onEvent = opts.onEvent || (() => {});
      this.onStatus = opts.onStatus || (() => {});
      /** The transport in use: "websocket", "sse" or "poll" ("auto" starts with WebSocket). */
      this.transport = transport === "sse" || transport === "poll" ? transport : "websocket";
      /** The id of the last event or snapshot received: the resume point. */
      this.lastEventId = null;
      this._running = false;
      this._attempt = 0; // reconnects since the last connection that stayed up (STABLE_AFTER_MS)
      this._failedOpens = 0; // WebSockets in a row that never opened or were cut off at once
      this._stableTimer = null;
      this._socket = null;
      this._source = null;
      this._poll = null; // the AbortController of the long-poll loop
      this._timer = null;
      this._pending = []; // commands sent on the WebSocket, awaiting their replies in order
      this.getToken = typeof opts.getToken === "function" ? opts.getToken : null;
      const pollTimeoutMs = opts.pollTimeoutMs ?? POLL_ANSWER_MS;
      if (typeof pollTimeoutMs !== "number" || !(pollTimeoutMs > 0 && pollTimeoutMs < 2 ** 31)) {
        throw new Error(`pollTimeoutMs must be a positive number of ms, got ${pollTimeoutMs}`);
      }
      /** How long a long poll may go unanswered before a new one is made. */
      this.pollTimeoutMs = pollTimeoutMs;
      this._silenceTimer = null; // the open connection is taken for dead when it fires
      this._refreshTimer = null;
      this._refreshedSinceMessage = false; // a refused token was replaced: no second try
      /** Share one connection among this browser's tabs (Web Locks + BroadcastChannel). */
      this.shareConnection = opts.shareConnection !== false && canShareConnections();
      /** True in the tab that holds the connection (always, without sharing). */
      this.leader = !this.shareConnection;
      this._channel = null;
      this._tabId = Math.random().toString(36).slice(2);
      this._lockAbort = null;
      this._releaseLock = null;
      this._shared = null; // the leader's view of the unfinished tasks, for tabs that join
      this._lastStatus = undefined; // the leader's, for tabs that join
      this._seenIds = [];
    }

    start() {
      if (this._running) return;
      this._running = true;
      this._scheduleTokenRefresh();
      if (this.shareConnection) {
        this._joinTabs();
        return;
      }
      this._connect();
    }

    stop() {
      this._running = false;
      clearTimeout(this._timer);
      this._timer = null;
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      this._disconnect();
      this._leaveTabs();
      this._status("stopped", "stopped");
    }

    /** Send a command over the WebSocket; false when there is no open WebSocket. */
    send(command) {
      const socket = this._socket;
      if (socket === null || socket.readyState !== WebSocket.OPEN) return false;
      // The server answers every message, in order: its answer (an error too) settles this
      // place in the queue, not a command sent after it.
      const kind = command !== null && typeof command === "object" ? command.type : undefined;
      const replyType = Object.prototype.hasOwnProperty.call(REPLY_TYPES, kind)
        ? REPLY_TYPES[kind]
        : "error";
      this._awaitReply(replyType, undefined, () => {}, () => {}, String(kind));
      socket.send(JSON.stringify(command));
      return true;
    }

    /**
     * The task's state: resolves to {type: "task_status", task_id, status}, where status is
     * null when the task is unknown or not the user's (the two look the same).
     */
    getTaskStatus(taskId) {
      taskId = String(taskId);
      if (this._webSocketOpen()) {
        return this._command({ type: "get_task_status", task_id: taskId }, "task_status");
      }
      return this._taskCommand("GET", taskId, "").catch((error) => {
        // Unknown and not the user's: a 404 over HTTP, `status: null` on the WebSocket.
        if (error.code === "task_not_found") {
          return { type: "task_status", task_id: taskId, status: null };
        }
        throw error;
      });
    }

    /**
     * Ask the producer to stop the task: resolves to {type: "task_cancelled", task_id, success};
     * success is true only when the request was recorded for a running task of the user.
     */
    cancelTask(taskId) {
      taskId = String(taskId);
      if (this._webSocketOpen()) {
        return this._command({ type: "cancel_task", task_id: taskId }, "task_cancelled");
      }
      return this._taskCommand("POST", taskId, "/cancel");
    }

    /**
     * The user's unfinished tasks: resolves to an `active_tasks` message (tasks newest first,
     * `truncated` when there are more than a snapshot carries). Over HTTP its `id` is the
     * snapshot's own position and does not move this stream's resume point.
     */
    getActiveTasks() {
      if (this._webSocketOpen()) {
        return this._command({ type: "get_active_tasks" }, "active_tasks");
      }
      return this._http("GET", "/api/tasks/");
    }

    /**
     * A task's command over HTTP. `.` and `..` (which every URL parser takes for
     * dot-segments) and the empty id are no task's: refused here, as the server refuses
     * them on the WebSocket, instead of going to another path.
     */
    _taskCommand(method, taskId, suffix) {
      if (taskId === "" || taskId === "." || taskId === "..") {
        const text = `no task can have the id ${JSON.stringify(taskId)}`;
        return Promise.reject(new CommandError("invalid_task_id", text));
      }
      return this._http(method, `/api/tasks/${encodeURIComponent(taskId)}${suffix}`);
    }

    _webSocketOpen() {
      return this._socket !== null && this._socket.readyState === WebSocket.OPEN;
    }

    /** Send a command on the WebSocket; the server answers commands in order. */
    _command(command, replyType) {
      return new Promise((resolve, reject) => {
        this._awaitReply(replyType, command.task_id, resolve, reject, command.type);
        this._socket.send(JSON.stringify(command));
      });
    }

    /** Queue the wait for the answer to a message about to be sent (`what`, for errors). */
    _awaitReply(replyType, taskId, resolve, reject, what) {
      const entry = { replyType, taskId, resolve, reject, timer: null };
      entry.timer = setTimeout(() => {
        this._pending = this._pending.filter((other) => other !== entry);
        reject(new CommandError("timeout", `no reply to ${what}`));
      }, COMMAND_TIMEOUT_MS);
      this._pending.push(entry);
    }

    /** Settle the oldest pending command with this message, if it is its reply. */
    _settle(message) {
      const entry = this._pending[0];
      if (entry === undefined) return;
      if (message.type === "error") {
        this._pending.shift();
        clearTimeout(entry.timer);
        entry.reject(new CommandError(message.code, message.message));
        return;
      }
      if (message.type !== entry.replyType) return; // an event, or another kind of reply
      if (entry.taskId !== undefined && message.task_id !== entry.taskId) return;
      this._pending.shift();
      clearTimeout(entry.timer);
      entry.resolve(message);
    }

    _failPending(text) {
      const pending = this._pending;
      this._pending = [];
      for (const entry of pending) {
        clearTimeout(entry.timer);
        entry.reject(new CommandError("connection_closed", text));
      }
    }

    /** A command over HTTP with the current token; on a 401, once more with a fresh one. */
    async _http(method, path) {
      try {
        return await this._httpOnce(method, path);
      } catch (error) {
        if (error.status !== 401 || this.getToken === null) throw error;
        const token = await this._freshToken();
        if (token === null || token === this.token) throw error;
        this._useToken(token);
        return this._httpOnce(method, path);
      }
    }

    /** A command over HTTP: the token as a Bearer header, else the session cookie. */
    async _httpOnce(method, path) {
      const headers = { Accept: "application/json" };
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      let response;
      try {
        response = await fetch(new URL(path, this.url).toString(), {
          method,
          headers,
          // Cookies go along to a listed origin only when there is no token to send.
          credentials: this.token ? "same-origin" : "include",
          cache: "no-store",
          signal: AbortSignal.timeout(COMMAND_TIMEOUT_MS),
        });
      } catch (error) {
        if (error.name === "TimeoutError") {
          throw new CommandError("timeout", `no reply to ${method} ${path}`);
        }
        throw new CommandError("network_error", `${method} ${path} failed: ${error.message}`);
      }
      let body = null;
      try {
        body = await response.json();
      } catch (error) {
        body = null;
      }
      if (!response.ok) {
        const code = body && typeof body.code === "string" ? body.code : `http_${response.status}`;
        const text = body && typeof body.message === "string" ? body.message : response.statusText;
        throw new CommandError(code, text, response.status);
      }
      if (body === null || typeof body !== "object") {
        throw new CommandError("invalid_reply", `${method} ${path}: not a JSON object`);
      }
      return body;
    }

    _connect() {
      clearTimeout(this._timer);
      this._timer = null;
      if (!this._running || !this.leader) return;
      // One connection at a time: a token refresh and a refusal may both reconnect.
      this._disconnect();
      this._status(`connecting (${this.transport})`, "connecting");
      if (this.transport === "websocket") {
        this._openWebSocket();
      } else if (this.transport === "poll") {
        this._startPolling();
      } else {
        this._openEventSource();
      }
    }

    _endpoint(path, scheme) {
      const url = new URL(path, this.url);
      if (scheme === "ws") url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      if (this.token) url.searchParams.set("token", this.token);
      if (this.taskId) url.searchParams.set("task_id", this.taskId);
      if (this.lastEventId) url.searchParams.set("last_event_id", this.lastEventId);
      url.searchParams.set("heartbeat", "event"); // heartbeats a page can see
      return url.toString();
    }

    _openWebSocket() {
      let socket;
      try {
        socket = new WebSocket(this._endpoint("/ws/tasks/", "ws"));
      } catch (error) {
        this._webSocketFailed(`cannot open a WebSocket: ${error.message}`);
        return;
      }
      let opened = false;
      let received = false;
      let openedAt = 0;
      this._socket = socket;
      const liveness = this._liveness(() => this._socket === socket, "the WebSocket");
      socket.onopen = () => {
        opened = true;
        openedAt = Date.now();
        this._markStableLater();
        liveness.heard();
        this._status("connected (websocket)", "connected");
      };
      socket.onmessage = (event) => {
        if (this._socket !== socket) return; // replaced: its last messages are not ours
        received = true;
        this._receive(event.data, liveness);
      };
      socket.onclose = (event) => {
        if (this._socket !== socket) return; // stopped or replaced
        this._socket = null;
        this._cancelStable();
        // Opened, but closed before its first message, or cut off (no close frame) soon after:
        // a path that lets the upgrade through but not the connection.
        const cutOff =
          !refusedForNow(event) &&
          (!received || (event.code === CLOSE_ABNORMAL && Date.now() - openedAt < STABLE_AFTER_MS));
        this._failPending(`the WebSocket closed (code ${event.code})`);
        if (!this._running) return;
        if (event.code === CLOSE_UNAUTHORIZED) {
          this._refused(`not authorised (${event.reason || "unauthorized"})`);
        } else if (!opened) {
          this._webSocketFailed("the WebSocket did not open");
        } else if (cutOff) {
          this._webSocketFailed(`the WebSocket was cut off (code ${event.code})`);
        } else {
          this._reconnect(`connection closed (code ${event.code})`);
        }
      };
    }

    /**
     * Takes a connection (`isCurrent` while it is this stream's) for dead, and opens
     * another, once it brought nothing for three heartbeat intervals plus a margin. The
     * interval comes with the heartbeats (`heartbeat(message)`); `heard()` for the rest,
     * and when it opens.
     */
    _liveness(isCurrent, what) {
      let silenceMs = FIRST_HEARTBEAT_MS;
      const heard = () => {
        clearTimeout(this._silenceTimer);
        this._silenceTimer = setTimeout(() => {
          this._silenceTimer = null;
          if (!isCurrent() || !this._running) return;
          this._reconnect(`${what} brought nothing for ${Math.round(silenceMs / 1000)} s`);
        }, silenceMs);
      };
      const heartbeat = (message) => {
        const interval = message !== null && typeof message === "object" ? message.interval_s : null;
        if (typeof interval === "number" && interval > 0 && interval <= 3600) {
          silenceMs = interval * 1000 * HEARTBEATS_MISSED + HEARTBEAT_MARGIN_MS;
        }
        heard();
      };
      return { heard, heartbeat };
    }

    _webSocketFailed(text) {
      if (this.requestedTransport === "auto") {
        // A server that cannot be reached at all is down (restarting, say), not behind a
        // proxy that refuses the upgrade: only failures while it answers over HTTP count
        // towards SSE, so that a restart does not leave the page on SSE for good.
        reachable(this.url).then((answers) => {
          if (!this._running || this._socket !== null || this._timer !== null) return;
          if (answers) this._failedOpens += 1;
          if (this._failedOpens >= WEBSOCKET_FAILURES_BEFORE_SSE) {
            this.transport = "sse";
            this._attempt = 0;
            this._connect();
          } else {
            this._reconnect(text); // SSE, next, tells a refusal from a network error
          }
        });
        return;
      }
      // A refusal at the handshake (STREAMER_WS_REFUSE_AT_HANDSHAKE) shows as nothing but a
      // socket that did not open: ask over HTTP whether the credentials are the cause.
      refusedAsUnauthorized(this._endpoint("/sse/tasks/", "http"), !this.token).then(
        (unauthorized) => {
          if (!this._running || this._socket !== null || this._timer !== null) return;
          if (unauthorized) {
            this._refused("not authorised");
          } else {
            this._reconnect(text);
          }
        },
      );
    }

    _openEventSource() {
      const url = this._endpoint("/sse/tasks/", "http");
      // Without a token the credentials are cookies: sent to another origin only when asked.
      const source = new EventSource(url, { withCredentials: !this.token });
      this._source = source;
      let received = false;
      const liveness = this._liveness(() => this._source === source, "the event stream");
      source.onopen = () => {
        this._markStableLater();
        liveness.heard();
        this._status("connected (sse)", "connected");
      };
      for (const name of [...SSE_EVENTS, "heartbeat"]) {
        source.addEventListener(name, (event) => {
          if (this._source !== source) return; // replaced
          if (name !== "heartbeat") received = true;
          this._receive(event.data, liveness);
        });
      }
      if (this.requestedTransport === "auto") {
        // The snapshot is the first thing the server sends, at once: a stream that brings
        // nothing for this long, from a server that answers over HTTP, is held back by a
        // buffering proxy. Long polls get through there, each answer being a complete
        // response. A server that cannot be reached is down (the browser retries the
        // stream by itself meanwhile): that is looked at again later, and once it answers
        // again, the stream gets as long again to bring its snapshot.
        let wasDown = false;
        const checkFirstMessage = () => {
          if (received || this._source !== source || !this._running) return;
          reachable(this.url).then((answers) => {
            if (received || this._source !== source || !this._running) return;
            if (!answers || wasDown) {
              wasDown = !answers;
              setTimeout(checkFirstMessage, SSE_FIRST_MESSAGE_MS);
              return;
            }
            this._disconnect();
            this.transport = "poll";
            const text = "the event stream brings nothing (a buffering proxy?): long polling";
            this._status(text, "connecting");
            this._connect();
          });
        };
        setTimeout(checkFirstMessage, SSE_FIRST_MESSAGE_MS);
      }
      source.onerror = () => {
        if (this._source !== source || !this._running) return;
        if (source.readyState !== EventSource.CLOSED) {
          // The browser reconnects by itself and sends Last-Event-ID.
          this._status("connection lost: reconnecting (sse)", "reconnecting");
          return;
        }
        // The browser gave up (an HTTP error): find out whether the token is the cause.
        source.close();
        this._source = null;
        refusedAsUnauthorized(url, !this.token).then((unauthorized) => {
          if (!this._running || this._source !== null || this._timer !== null) return;
          if (unauthorized) {
            this._refused("not authorised");
          } else {
            this._reconnect("the event stream failed");
          }
        });
      };
    }

    /**
     * Long polling: one GET /poll/tasks/ after another, each resuming from the last id. The
     * server holds a poll until events come (or its timeout: then an empty answer).
     */
    _startPolling() {
      const controller = new AbortController();
      this._poll = controller;
      this._pollLoop(controller);
    }

    async _pollLoop(controller) {
      let shown = false; // "connected" on the page
      let answered = false; // a poll was answered: the backoff may start over
      const showConnected = () => {
        if (shown || this._poll !== controller || !this._running) return;
        shown = true;
        this._status("connected (poll)", "connected");
      };
      let first = true;
      while (this._running && this._poll === controller) {
        const url = new URL("/poll/tasks/", this.url);
        if (this.taskId) url.searchParams.set("task_id", this.taskId);
        if (this.lastEventId) url.searchParams.set("last_event_id", this.lastEventId);
        const headers = { Accept: "application/json" };
        if (this.token) headers.Authorization = `Bearer ${this.token}`;
        if (first && this.lastEventId) {
          // A resumed poll is held until events come: whether the server would take it
          // is asked with HEAD (answered at once, nothing read, nothing held), so that
          // the page shows itself connected meanwhile. Only an answered poll counts
          // towards the backoff starting over: the poll may still fail (Redis away).
          pollTaken(url.toString(), headers, this.token).then((taken) => taken && showConnected());
        }
        first = false;
        let response;
        let body;
        // Aborted when the loop is stopped or replaced, or when no answer came in time.
        const request = new AbortController();
        const stop = () => request.abort();
        controller.signal.addEventListener("abort", stop, { once: true });
        let timedOut = false;
        const timer = setTimeout(() => {
          timedOut = true;
          request.abort();
        }, this.pollTimeoutMs);
        try {
          response = await fetch(url.toString(), {
            headers,
            credentials: this.token ? "same-origin" : "include",
            cache: "no-store",
            signal: request.signal,
          });
          body = response.ok ? await response.json() : null;
        } catch (error) {
          if (this._poll !== controller) return; // stopped or replaced
          const seconds = Math.round(this.pollTimeoutMs / 1000);
          const text = timedOut ? `no answer in ${seconds} s` : error.message;
          this._reconnect(`the poll failed: ${text}`);
          return;
        } finally {
          clearTimeout(timer);
          controller.signal.removeEventListener("abort", stop);
        }
        if (this._poll !== controller || !this._running) return;
        if (response.status === 401) {
          this._refused("not authorised"); // a fresh token from getToken, else stop
          return;
        }
        if (!response.ok || body === null || !Array.isArray(body.events)) {
          this._reconnect(`the poll failed (HTTP ${response.status})`);
          return;
        }
        // The token was taken: its refusal later gets a new one (a resumed poll of an idle
        // user may answer nothing, so no message says it).
        this._refreshedSinceMessage = false;
        showConnected();
        if (!answered) {
          answered = true;
          this._markStableLater();
        }
        for (const message of body.events) {
          if (this._poll !== controller) return;
          if (message === null || typeof message !== "object") continue;
          this._deliver(message);
        }
        if (typeof body.last_event_id === "string" && body.last_event_id) {
          this.lastEventId = body.last_event_id;
        }
      }
    }

    _receive(data, liveness) {
      let message;
      try {
        message = JSON.parse(data);
      } catch (error) {
        return; // not ours: ignore
      }
      if (message === null || typeof message !== "object") return;
      if (message.type === "heartbeat") {
        liveness.heartbeat(message); // for the connection only
        return;
      }
      liveness.heard();
      this._deliver(message);
    }

    /** One message from the server, whatever the transport. */
    _deliver(message) {
      this._refreshedSinceMessage = false;
      if (typeof message.id === "string" && message.id) this.lastEventId = message.id;
      this._settle(message);
      if (this._channel !== null && SSE_EVENTS.includes(message.type)) {
        this._track(message);
        this._post({ kind: "event", message });
      }
      try {
        this.onEvent(message);
      } catch (error) {
        // Reported as from any event handler, without ending the long-poll loop.
        setTimeout(() => {
          throw error;
        });
      }
    }

    _reconnect(text) {
      this._disconnect();
      // Equal jitter: between half and all of 0.5 s, 1 s, 2 s, ... capped at 10 s.
      const base = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** this._attempt);
      const delay = base / 2 + Math.random() * (base / 2);
      this._attempt += 1;
      const seconds = (delay / 1000).toFixed(1);
      this._status(`${text}: reconnecting in ${seconds} s`, "reconnecting");
      this._timer = setTimeout(() => this._connect(), delay);
    }

    /** The backoff starts over once the connection has stayed up for a while. */
    _markStableLater() {
      this._cancelStable();
      this._stableTimer = setTimeout(() => {
        this._stableTimer = null;
        this._attempt = 0;
        this._failedOpens = 0;
      }, STABLE_AFTER_MS);
    }

    _cancelStable() {
      clearTimeout(this._stableTimer);
      this._stableTimer = null;
    }

    _disconnect() {
      this._cancelStable();
      clearTimeout(this._silenceTimer);
      this._silenceTimer = null;
      const socket = this._socket;
      const source = this._source;
      const poll = this._poll;
      this._socket = null;
      this._source = null;
      this._poll = null;
      this._failPending("the connection was closed");
      if (socket !== null) socket.close(1000);
      if (source !== null) source.close();
      if (poll !== null) poll.abort();
    }

    _status(text, state) {
      this._lastStatus = { text, state };
      if (this._channel !== null && this.leader) {
        this._post({ kind: "status", text, state, transport: this.transport });
      }
      this.onStatus(text, state);
    }

    /** Sharing: wait for the tabs' lock (then lead) and follow the leader meanwhile. */
    _joinTabs() {
      const name = this._shareName();
      this._channel = new BroadcastChannel(name);
      this._channel.onmessage = (event) => this._fromTab(event.data);
      this.leader = false;
      this.onStatus("connecting (shared with other tabs)", "connecting");
      this._post({ kind: "hello", from: this._tabId });
      const abort = new AbortController();
      this._lockAbort = abort;
      const held = () =>
        new Promise((release) => {
          this._lockAbort = null;
          if (!this._running) {
            release();
            return;
          }
          this._releaseLock = release;
          this._lead();
        });
      global.navigator.locks.request(name, { signal: abort.signal }, held).catch(() => {});
    }

    /** This tab holds the lock: it connects, resuming from the last id it saw. */
    _lead() {
      this.leader = true;
      this._shared = { tasks: new Map(), truncated: false, ready: false };
      this._connect();
    }

    _leaveTabs() {
      const channel = this._channel;
      this._channel = null;
      if (this._lockAbort !== null) this._lockAbort.abort();
      if (this._releaseLock !== null) this._releaseLock();
      this._lockAbort = this._releaseLock = null;
      this._shared = null;
      this.leader = !this.shareConnection;
      if (channel !== null) channel.close();
    }

    _shareName() {
      const payload = jwtPayload(this.token);
      const who = payload !== null && payload.sub ? `sub:${payload.sub}` : this.token || "session";
      const origin = new URL(this.url, global.location.href).origin;
      return `streamer ${origin} ${who} ${this.taskId || ""}`;
    }

    _post(data) {
      try {
        this._channel.postMessage(data);
      } catch (error) {
        // closed meanwhile: nothing to tell
      }
    }

    /** A message from another tab of this browser. */
    _fromTab(data) {
      if (data === null || typeof data !== "object" || !this._running) return;
      if (data.kind === "hello") {
        // A tab that just joined: give it the current state, as a fresh connection would.
        if (!this.leader) return;
        const last = this._lastStatus;
        if (last !== undefined) {
          this._post({ kind: "status", to: data.from, transport: this.transport, ...last });
        }
        if (this._shared !== null && this._shared.ready) {
          this._post({ kind: "event", to: data.from, message: this._snapshot() });
        }
        return;
      }
      if (this.leader) return;
      if (data.to !== undefined && data.to !== this._tabId) return;
      if (data.kind === "status") {
        if (typeof data.transport === "string") this.transport = data.transport;
        this.onStatus(data.text, data.state);
        if (data.state === "unauthorized") {
          // The leader's token (the same user's) was refused: no tab retries it.
          this._running = false;
          this._leaveTabs();
        }
      } else if (data.kind === "event") {
        const message = data.message;
        if (message.type !== "active_tasks" && typeof message.id === "string") {
          if (this._seenIds.includes(message.id)) return; // relayed twice (a new leader)
          this._seenIds.push(message.id);
          if (this._seenIds.length > SEEN_IDS_KEPT) this._seenIds.shift();
        }
        if (typeof message.id === "string" && message.id) this.lastEventId = message.id;
        this.onEvent(message);
      }
    }

    /** The leader keeps the unfinished tasks (events carry a task's full state). */
    _track(message) {
      const shared = this._shared;
      if (shared === null) return;
      if (message.type === "active_tasks") {
        shared.tasks = new Map((message.tasks || []).map((task) => [task.task_id, task]));
        shared.truncated = Boolean(message.truncated);
        shared.ready = true;
      } else if (message.type === "task_completed") {
        shared.tasks.delete(message.task_id);
      } else {
        const task = { ...message };
        delete task.type;
        delete task.id;
        if (shared.tasks.has(task.task_id)) {
          shared.tasks.set(task.task_id, task);
        } else {
          shared.tasks = new Map([[task.task_id, task], ...shared.tasks]); // newest first
        }
      }
    }

    _snapshot() {
      const tasks = Array.from(this._shared.tasks.values());
      const truncated = this._shared.truncated;
      return { type: "active_tasks", tasks, truncated, recovered: true, id: this.lastEventId };
    }

    /** The server refused the token: one try with a fresh one from getToken, else stop. */
    async _refused(text) {
      this._disconnect();
      let token = null;
      if (this.getToken !== null && !this._refreshedSinceMessage) {
        this._refreshedSinceMessage = true;
        this._status(`${text}: getting a new token`, "connecting");
        token = await this._freshToken();
      }
      if (!this._running) return;
      if (token === null) {
        this._running = false;
        clearTimeout(this._refreshTimer);
        this._refreshTimer = null;
        this._status(`${text}: get a new token`, "unauthorized");
        this._leaveTabs(); // after telling the other tabs, which stop too
        return;
      }
      this._useToken(token);
      this._connect();
    }

    /** getToken's answer, or null when it gave nothing, failed or took too long. */
    async _freshToken() {
      let timer = null;
      const tooLong = new Promise((resolve) => {
        timer = setTimeout(() => resolve(null), COMMAND_TIMEOUT_MS);
      });
      try {
        const token = await Promise.race([this.getToken(), tooLong]);
        return typeof token === "string" && token ? token : null;
      } catch (error) {
        return null;
      } finally {
        clearTimeout(timer);
      }
    }

    _useToken(token) {
      this.token = token;
      this._scheduleTokenRefresh();
    }

    /** With getToken and a JWT: fetch a new token shortly before this one expires. */
    _scheduleTokenRefresh() {
      clearTimeout(this._refreshTimer);
      this._refreshTimer = null;
      if (this.getToken === null || !this._running) return;
      const expiresAt = tokenExpiry(this.token);
      if (expiresAt === null) return; // not a JWT: refreshed only when refused
      const left = expiresAt - Date.now();
      const delay = Math.max(0, left - Math.min(REFRESH_BEFORE_EXP_MS, left / 2));
      const token = this.token;
      this._refreshTimer = setTimeout(() => this._refreshToken(token), delay);
    }

    /** Replace a token about to expire; the connection is reopened with it and resumes. */
    async _refreshToken(expiring) {
      this._refreshTimer = null;
      const token = await this._freshToken();
      // Nothing new: the server ends the connection at `exp` and the refusal decides.
      if (!this._running || this.token !== expiring || token === null || token === expiring) {
        return;
      }
      this._useToken(token);
      if (this._timer !== null) return; // reconnecting: the next attempt takes the new token
      this._disconnect();
      this._connect();
    }
  }

  /** The `exp` of a JWT in milliseconds, or null when the token is not a JWT with one. */
  function tokenExpiry(token) {
    const payload = jwtPayload(token);
    return payload !== null && typeof payload.exp === "number" ? payload.exp * 1000 : null;
  }

  /** The decoded payload of a JWT (base64url JSON), or null. Not verified: display only. */
  function jwtPayload(token) {
    if (typeof token !== "string") return null;
    const parts = token.split(".");
    if (parts.length !== 3) return null;
    try {
      const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
      const bytes = Uint8Array.from(atob(padded), (ch) => ch.charCodeAt(0));
      const payload = JSON.parse(new TextDecoder().decode(bytes));
      return payload !== null && typeof payload === "object" ? payload : null;
    } catch (error) {
      return null;
    }
  }

  function canShareConnections() {
    const locks = global.navigator && global.navigator.locks;
    return typeof BroadcastChannel === "function" && !!locks && typeof locks.request === "function";
  }

  /** Whether the server closed a WebSocket with one of its refusals for now. */
  function refusedForNow(closeEvent) {
    if (closeEvent.code === CLOSE_TOO_MANY) return true;
    const reasons = SERVER_REFUSAL_REASONS[closeEvent.code];
    return reasons !== undefined && reasons.has(closeEvent.reason);
  }

  /** Whether the server answers over HTTP at all (any answer, readable or not). */
  async function reachable(url) {
    try {
      await fetch(new URL("/healthz", url).toString(), {
        mode: "no-cors",
        cache: "no-store",
        signal: AbortSignal.timeout(REFUSAL_CHECK_MS),
      });
      return true;
    } catch (error) {
      return false;
    }
  }

  /**
   * Would the SSE endpoint answer 401? Asked with HEAD: the server answers what a GET
   * would get, without opening a stream (no snapshot read, no turn of the user's).
   */
  async function refusedAsUnauthorized(url, withCookies) {
    const controller = new AbortController();
    // No answer in time (a proxy or network that holds it) is no refusal.
    const timer = setTimeout(() => controller.abort(), REFUSAL_CHECK_MS);
    try {
      const response = await fetch(url, {
        method: "HEAD",
        signal: controller.signal,
        cache: "no-store",
        credentials: withCookies ? "include" : "same-origin",
      });
      return response.status === 401;
    } catch (error) {
      return false;
    } finally {
      clearTimeout(timer);
      controller.abort();
    }
  }

  /** Would a poll be taken (HEAD: answered at once, nothing read, nothing held)? */
  async function pollTaken(url, headers, token) {
    try {
      const response = await fetch(url, {
        method: "HEAD",
        headers,
        credentials: token ? "same-origin" : "include",
        cache: "no-store",
        signal: AbortSignal.timeout(REFUSAL_CHECK_MS),
      });
      return response.ok;
    } catch (error) {
      return false;
    }
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /**
   * Keeps task_id -> latest task state from the stream's messages and renders one row per task
   * into `container`: <div class="task" data-task-id data-status> with name, id, a
   * <progress max="100">, status and current step. All text goes through textContent.
   *
   * options.onCancel(taskId): when given and `cancellable` is true, unfinished rows get a
   * Cancel button that calls it.
   */
  class TaskBoard {
    constructor(container, options) {
      const opts = options || {};
      this.container = container;
      this.onCancel = opts.onCancel || null;
      this._cancellable = opts.cancellable !== undefined ? Boolean(opts.cancellable) : true;
      /** task_id -> task state, newest first. */
      this.tasks = new Map();
      this._rows = new Map();
      this.render();
    }

    get cancellable() {
      return this._cancellable;
    }

    set cancellable(value) {
      this._cancellable = Boolean(value);
      this.render();
    }

    /** Apply one server message; returns true when it changed the board. */
    handle(message) {
      switch (message.type) {
        case "active_tasks":
          this.tasks = new Map((message.tasks || []).map((task) => [task.task_id, { ...task }]));
          break;
        case "task_progress":
          this._merge(message);
          break;
        case "task_completed": {
          const done = { ...message };
          if (done.status === "SUCCESS") {
            // Done means all of it, even when the last progress report came before the end.
            done.progress = 100;
            if (done.total_items !== null && done.total_items !== undefined) {
              done.processed_items = done.total_items;
            }
          }
          this._merge(done);
          break;
        }
        case "task_status":
          if (message.status === null || typeof message.status !== "object") return false;
          this._merge(message.status);
          break;
        default:
          return false;
      }
      this.render();
      return true;
    }

    _merge(update) {
      const known = this.tasks.get(update.task_id);
      const fields = { ...update };
      delete fields.type;
      delete fields.id;
      if (known !== undefined) {
        Object.assign(known, fields);
      } else {
        // A task not in the snapshot is new: it goes first, like in active_tasks.
        this.tasks = new Map([[update.task_id, fields], ...this.tasks]);
      }
    }

    render() {
      const container = this.container;
      for (const [taskId, row] of this._rows) {
        if (!this.tasks.has(taskId)) {
          row.remove();
          this._rows.delete(taskId);
        }
      }
      let empty = container.querySelector(":scope > .tasks-empty");
      if (this.tasks.size === 0 && empty === null) {
        container.appendChild(element("p", "tasks-empty", "No active tasks."));
      } else if (this.tasks.size > 0 && empty !== null) {
        empty.remove();
      }
      for (const [taskId, task] of this.tasks) {
        let row = this._rows.get(taskId);
        if (row === undefined) {
          row = this._createRow(taskId);
          this._rows.set(taskId, row);
        }
        this._updateRow(row, task);
        container.appendChild(row); // moves existing rows into order
      }
    }

    _createRow(taskId) {
      const row = element("div", "task");
      row.dataset.taskId = taskId;
      const head = element("div", "task-head");
      head.append(element("span", "task-name"), element("code", "task-id", taskId));
      const bar = element("progress", "task-progress");
      bar.max = 100;
      const line = element("div", "task-line");
      line.append(
        element("span", "task-percent"),
        element("span", "task-status"),
        element("span", "task-step"),
      );
      const cancel = element("button", "task-cancel", "Cancel");
      cancel.type = "button";
      cancel.addEventListener("click", () => {
        if (this.onCancel !== null) this.onCancel(taskId);
      });
      row.append(head, bar, line, element("div", "task-detail"), cancel);
      return row;
    }

    _updateRow(row, task) {
      const status = String(task.status || "PENDING");
      const progress = Math.max(0, Math.min(100, Number(task.progress) || 0));
      const finished = TERMINAL.has(status);
      row.dataset.status = status;
      row.querySelector(".task-name").textContent = task.task_name || "task";
      const bar = row.querySelector("progress");
      bar.value = progress;
      bar.textContent = `${Math.round(progress)}%`;
      row.querySelector(".task-percent").textContent = `${Math.round(progress)}%`;
      row.querySelector(".task-status").textContent = status;
      row.querySelector(".task-step").textContent = describeStep(task);
      row.querySelector(".task-detail").textContent = describeOutcome(task, status);
      row.querySelector(".task-cancel").hidden =
        finished || this.onCancel === null || !this._cancellable;
    }
  }

  function describeStep(task) {
    const parts = [];
    if (task.current_step) parts.push(String(task.current_step));
    if (task.total_items !== null && task.total_items !== undefined) {
      parts.push(`${task.processed_items || 0}/${task.total_items} items`);
    }
    return parts.join(" · ");
  }

  function describeOutcome(task, status) {
    if (task.error_message) return `Error: ${task.error_message}`;
    const result = task.result_data;
    if (status === "SUCCESS" && result && Object.keys(result).length > 0) {
      const text = JSON.stringify(result);
      return `Result: ${text.length > 200 ? text.slice(0, 199) + "…" : text}`;
    }
    return "";
  }

  global.Streamer = { TaskStream, TaskBoard, CommandError };
})(globalThis);
