// herald-client 0.1.0: Herald's browser client (MIT OR Apache-2.0).
// Built from clients/js/src by clients/js/build.mjs: edit the sources, not this file.

// src/backoff.ts
function backoffDelay(attempt, options, floorMs = 0) {
  const steps = Math.max(0, Math.min(attempt - 1, 30));
  const ceiling = Math.min(options.maxDelayMs, options.minDelayMs * 2 ** steps);
  const delay = ceiling / 2 + ceiling / 2 * clampUnit(options.random());
  return Math.round(Math.max(delay, Math.min(floorMs, options.maxDelayMs)));
}
function drainDelay(jitterMs, random) {
  return Math.round(Math.max(0, jitterMs) * clampUnit(random()));
}
function clampUnit(value) {
  return Number.isFinite(value) ? Math.min(Math.max(value, 0), 1) : 0.5;
}
var Backoff = class {
  constructor(options) {
    this.options = options;
    this.attempts = 0;
  }
  /** Attempts counted so far. */
  get attempt() {
    return this.attempts;
  }
  /** Counts one more failed attempt and returns the delay before the next one. */
  next(floorMs = 0) {
    this.attempts += 1;
    return backoffDelay(this.attempts, this.options, floorMs);
  }
  /** A connection succeeded: start again from the shortest delay. */
  reset() {
    this.attempts = 0;
  }
};

// src/link.ts
function pageSignals() {
  const win = typeof window !== "undefined" && typeof window.addEventListener === "function" ? window : void 0;
  const doc = typeof document !== "undefined" && typeof document.addEventListener === "function" ? document : void 0;
  return {
    online: () => typeof navigator === "undefined" || navigator.onLine !== false,
    visible: () => !doc || doc.visibilityState !== "hidden",
    watch(listener) {
      const online = () => listener("online");
      const offline = () => listener("offline");
      const visibility = () => listener(doc && doc.visibilityState === "hidden" ? "hidden" : "visible");
      win?.addEventListener("online", online);
      win?.addEventListener("offline", offline);
      doc?.addEventListener("visibilitychange", visibility);
      return () => {
        win?.removeEventListener("online", online);
        win?.removeEventListener("offline", offline);
        doc?.removeEventListener("visibilitychange", visibility);
      };
    }
  };
}
var Link = class {
  constructor(settings) {
    this.settings = settings;
    this.current = "closed";
    this.started = false;
    this.stopped = false;
    this.urlIndex = 0;
    this.timer = null;
    this.hiddenTimer = null;
    this.unwatch = null;
    this.everOpened = false;
    this.info = {};
    this.backoff = new Backoff(settings);
  }
  get state() {
    return this.current;
  }
  /** The base URL in use. */
  get url() {
    return this.settings.urls[this.urlIndex % this.settings.urls.length];
  }
  /** The page became visible again (check what timers may have missed). */
  onVisible() {
  }
  get isStopped() {
    return this.stopped;
  }
  start() {
    if (this.started || this.stopped) return;
    this.started = true;
    this.unwatch = this.settings.signals.watch((change) => this.onPageChange(change));
    if (!this.settings.signals.online()) {
      this.setState("offline");
      return;
    }
    this.attempt("connecting");
  }
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    this.clearTimers();
    this.unwatch?.();
    this.unwatch = null;
    this.shut();
    this.setState("closed");
  }
  clearTimers() {
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.hiddenTimer !== null) clearTimeout(this.hiddenTimer);
    this.timer = null;
    this.hiddenTimer = null;
  }
  attempt(state) {
    if (this.stopped) return;
    this.timer = null;
    this.info = {};
    if (this.current !== state) this.setState(state);
    this.open(this.url);
  }
  /** The transport is open (call again with new details, for example SSE `herald.connected`). */
  opened(details = {}) {
    if (this.stopped) return;
    this.backoff.reset();
    this.everOpened = true;
    this.info = { ...this.info, ...details };
    this.setState("open");
  }
  /** The transport went down or was refused: shut it and try again as `retry` says. */
  lost(retry = {}) {
    if (this.stopped) return;
    this.shut();
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.current === "offline" || this.current === "paused") return;
    if (!this.settings.signals.online()) {
      this.setState("offline");
      return;
    }
    if (retry.nextUrl) this.urlIndex = (this.urlIndex + 1) % this.settings.urls.length;
    let delay;
    if (retry.immediate) delay = 0;
    else if (retry.drain) delay = drainDelay(this.settings.drainJitterMs, this.settings.random);
    else delay = this.backoff.next(retry.floorMs ?? 0);
    this.setState("reconnecting", { retryInMs: delay, error: retry.error });
    this.timer = setTimeout(() => this.attempt("reconnecting"), delay);
  }
  /** The transport is re-establishing itself (EventSource's own reconnect): say so, schedule nothing. */
  reconnectingByItself() {
    if (this.stopped || this.current === "reconnecting") return;
    this.setState("reconnecting");
  }
  /** Refused for good: stop, say why. */
  fail(error) {
    if (this.stopped) return;
    this.stopped = true;
    this.clearTimers();
    this.unwatch?.();
    this.unwatch = null;
    this.shut();
    this.setState("closed", { error });
  }
  /** Reconnect now (a pending retry is brought forward). */
  reconnectNow() {
    if (this.stopped || this.current === "offline" || this.current === "paused") return;
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.attempt("reconnecting");
    }
  }
  setState(state, extra = {}) {
    this.current = state;
    const info = {
      transport: this.settings.transport,
      url: this.url,
      attempt: this.backoff.attempt,
      ...state === "open" ? this.info : {},
      ...extra
    };
    this.emit(state, info);
  }
  onPageChange(change) {
    if (this.stopped) return;
    switch (change) {
      case "offline":
        if (this.timer !== null) clearTimeout(this.timer);
        this.timer = null;
        this.shut();
        this.setState("offline");
        break;
      case "online":
        if (this.current === "offline") {
          this.backoff.reset();
          this.attempt(this.everOpened ? "reconnecting" : "connecting");
        }
        break;
      case "hidden": {
        const after = this.settings.pauseWhenHiddenMs;
        if (after === null || after === void 0 || this.hiddenTimer !== null) break;
        this.hiddenTimer = setTimeout(() => {
          this.hiddenTimer = null;
          if (this.stopped || this.current === "offline") return;
          if (this.timer !== null) clearTimeout(this.timer);
          this.timer = null;
          this.shut();
          this.setState("paused");
        }, after);
        break;
      }
      case "visible":
        if (this.hiddenTimer !== null) clearTimeout(this.hiddenTimer);
        this.hiddenTimer = null;
        if (this.current === "paused") {
          if (!this.settings.signals.online()) {
            this.setState("offline");
            break;
          }
          this.backoff.reset();
          this.attempt(this.everOpened ? "reconnecting" : "connecting");
        } else if (this.timer !== null) {
          this.reconnectNow();
        } else {
          this.onVisible();
        }
        break;
    }
  }
};

// src/position.ts
function comparePositions(a, b) {
  if (a.epoch !== b.epoch) return null;
  return a.offset === b.offset ? 0 : a.offset < b.offset ? -1 : 1;
}
function isCovered(position, held) {
  if (!held) return false;
  const order = comparePositions(position, held);
  return order !== null && order <= 0;
}
function isPosition(value) {
  if (!value || typeof value !== "object") return false;
  const { epoch, offset } = value;
  return typeof epoch === "string" && epoch.length > 0 && Number.isSafeInteger(offset) && offset >= 0;
}
var RETIRED_EPOCHS = 8;
var PositionTracker = class {
  constructor() {
    this.channels = /* @__PURE__ */ new Map();
  }
  /** The position last handed over or reset to, if any. */
  get(channel) {
    return this.channels.get(channel)?.held;
  }
  /** Forgets a channel (unsubscribed). */
  forget(channel) {
    this.channels.delete(channel);
  }
  record(channel) {
    let record = this.channels.get(channel);
    if (!record) {
      record = { retired: [] };
      this.channels.set(channel, record);
    }
    return record;
  }
  move(record, to) {
    const from = record.held;
    if (from && from.epoch !== to.epoch) {
      record.retired = [from.epoch, ...record.retired.filter((e) => e !== from.epoch && e !== to.epoch)].slice(
        0,
        RETIRED_EPOCHS
      );
    }
    record.held = { epoch: to.epoch, offset: to.offset };
  }
  /**
   * Decides about a publication and, unless it is dropped, moves the channel to its position. The first
   * publication of a channel with no known position is delivered as it is.
   */
  accept(message) {
    const record = this.record(message.channel);
    const position = { epoch: message.epoch, offset: message.offset };
    const held = record.held;
    if (!held) {
      this.move(record, position);
      return { kind: "deliver" };
    }
    if (held.epoch === position.epoch) {
      if (position.offset <= held.offset) return { kind: "duplicate" };
      this.move(record, position);
      if (position.offset === held.offset + 1) return { kind: "deliver" };
      return { kind: "reset-then-deliver", reason: "gap", position: { epoch: held.epoch, offset: position.offset - 1 } };
    }
    if (record.retired.includes(position.epoch)) return { kind: "stale" };
    this.move(record, position);
    return {
      kind: "reset-then-deliver",
      reason: "epoch_changed",
      position: { epoch: position.epoch, offset: position.offset - 1 }
    };
  }
  /** Records a reset: delivery continues right after `position`. */
  reset(channel, position) {
    this.move(this.record(channel), position);
  }
  /**
   * Records the position Herald says the client holds now (WebSocket `subscribed`). Returns the reason
   * of a reset the application must hear when it does not follow from what it was handed, else null.
   */
  confirm(channel, position) {
    const record = this.record(channel);
    const held = record.held;
    this.move(record, position);
    if (!held) return null;
    const order = comparePositions(position, held);
    if (order === null) return "epoch_changed";
    if (order > 0) return "gap";
    if (order < 0) return "engine_rollback";
    return null;
  }
};

// src/dispatch.ts
function report(error) {
  const global = globalThis;
  if (typeof global.reportError === "function") global.reportError(error);
  else
    setTimeout(() => {
      throw error;
    }, 0);
}
function call(fn, ...args) {
  if (!fn) return;
  try {
    fn(...args);
  } catch (error) {
    report(error);
  }
}
function parseJson(text) {
  if (typeof text !== "string") return void 0;
  try {
    return JSON.parse(text);
  } catch {
    return void 0;
  }
}
function isEnvelope(value) {
  if (!value || typeof value !== "object") return false;
  const v = value;
  return typeof v.channel === "string" && isPosition(value);
}
function isResetNotice(value) {
  if (!isEnvelope(value)) return false;
  return typeof value.reason === "string";
}
function positionOf(value) {
  return { epoch: value.epoch, offset: value.offset };
}

// src/types.ts
var HeraldError = class extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
    this.status = extra.status;
    this.channel = extra.channel;
    this.fatal = extra.fatal ?? false;
  }
};

// src/urls.ts
function resolveBase(base, page) {
  const here = page ?? (typeof location !== "undefined" ? location.href : void 0);
  const url = here === void 0 ? new URL(base) : new URL(base || "/", here);
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  url.search = "";
  url.hash = "";
  return url;
}
function sseUrl(base, channels, options = {}) {
  const url = new URL("v1/sse", resolveBase(base, options.page));
  for (const channel of channels) url.searchParams.append("channel", channel);
  if (options.token) url.searchParams.set("token", options.token);
  if (options.lastEventId) url.searchParams.set("last_event_id", options.lastEventId);
  return url.toString();
}
function wsUrl(base, options = {}) {
  const url = new URL("v1/ws", resolveBase(base, options.page));
  if (url.protocol === "http:") url.protocol = "ws:";
  else if (url.protocol === "https:") url.protocol = "wss:";
  if (options.token) url.searchParams.set("token", options.token);
  return url.toString();
}
function subscribeFrame(id, channel, since) {
  const frame = { op: "subscribe", id, channel };
  if (since) frame.since = { epoch: since.epoch, offset: since.offset };
  return JSON.stringify(frame);
}

// src/sse.ts
var CONNECTED = "herald.connected";
var RESET = "herald.reset";
var FATAL_CODES = /* @__PURE__ */ new Set(["invalid_channel", "bad_request", "forbidden", "not_found", "method_not_allowed"]);
var SseSubscription = class extends Link {
  constructor(sse, channels, handlers, tokens) {
    super(sse);
    this.sse = sse;
    this.handlers = handlers;
    this.tokens = tokens;
    this.tracker = new PositionTracker();
    this.announced = /* @__PURE__ */ new Set();
    this.source = null;
    this.cursor = null;
    /** Errors since the stream was last connected. */
    this.errors = 0;
    /** Whether the current EventSource ever got `herald.connected`. */
    this.connectedOnce = false;
    /** Bumped whenever an attempt is abandoned, so its late callbacks are ignored. */
    this.generation = 0;
    this.channels = channels;
  }
  position(channel) {
    const held = this.tracker.get(channel);
    return held ? positionOf(held) : void 0;
  }
  close() {
    this.stop();
  }
  emit(state, info) {
    call(this.handlers.onState, state, info);
  }
  open(url) {
    const generation = ++this.generation;
    this.tokens.get().then(
      (token) => {
        if (generation === this.generation && !this.isStopped) this.connect(url, token, generation);
      },
      (error) => {
        if (generation !== this.generation) return;
        const failure = new HeraldError("token_error", `getToken failed: ${String(error)}`);
        call(this.handlers.onError, failure);
        this.lost({ error: failure });
      }
    );
  }
  shut() {
    this.generation++;
    const source = this.source;
    this.source = null;
    if (source) source.close();
  }
  connect(url, token, generation) {
    const href = sseUrl(url, this.channels, { token, lastEventId: this.cursor });
    let source;
    try {
      source = new this.sse.EventSource(href);
    } catch (error) {
      this.fail(new HeraldError("bad_request", `cannot open ${href}: ${String(error)}`, { fatal: true }));
      return;
    }
    this.source = source;
    this.errors = 0;
    this.connectedOnce = false;
    const live = () => generation === this.generation && this.source === source;
    source.addEventListener(CONNECTED, (event) => {
      if (live()) this.onConnected(event);
    });
    source.addEventListener(RESET, (event) => {
      if (live()) this.onReset(event);
    });
    const onPublication = (event) => {
      if (live()) this.onPublication(event);
    };
    for (const name of /* @__PURE__ */ new Set(["message", ...this.sse.events])) {
      if (name !== CONNECTED && name !== RESET) source.addEventListener(name, onPublication);
    }
    source.onerror = () => {
      if (live()) this.onStreamError(source, url, token);
    };
  }
  remember(event) {
    if (event.lastEventId) this.cursor = event.lastEventId;
  }
  onConnected(event) {
    this.remember(event);
    this.errors = 0;
    this.connectedOnce = true;
    const data = parseJson(event.data);
    this.opened({
      node: typeof data?.node === "string" ? data.node : void 0,
      connectionId: typeof data?.connection_id === "string" ? data.connection_id : void 0
    });
    for (const channel of this.channels) {
      if (this.announced.has(channel)) continue;
      this.announced.add(channel);
      const held = this.tracker.get(channel);
      call(this.handlers.onSubscribed, channel, held ? positionOf(held) : null);
    }
  }
  onReset(event) {
    this.remember(event);
    const notice = parseJson(event.data);
    if (!isResetNotice(notice)) {
      call(this.handlers.onError, new HeraldError("malformed_event", `unreadable ${RESET}: ${String(event.data)}`));
      return;
    }
    const position = positionOf(notice);
    this.tracker.reset(notice.channel, position);
    call(this.handlers.onReset, notice.channel, position, notice.reason);
  }
  onPublication(event) {
    this.remember(event);
    const message = parseJson(event.data);
    if (!isEnvelope(message)) {
      call(this.handlers.onError, new HeraldError("malformed_event", `unreadable ${event.type}: ${String(event.data)}`));
      return;
    }
    const verdict = this.tracker.accept(message);
    if (verdict.kind === "duplicate" || verdict.kind === "stale") return;
    if (verdict.kind === "reset-then-deliver") {
      call(this.handlers.onReset, message.channel, positionOf(verdict.position), verdict.reason);
    }
    call(this.handlers.onMessage, message);
  }
  /**
   * EventSource reports an error: with `readyState` CONNECTING it is reconnecting by itself (the stream
   * ended or the attempt failed), with CLOSED it gave up (an HTTP error or a wrong content type).
   */
  onStreamError(source, url, token) {
    this.errors += 1;
    if (source.readyState === this.sse.EventSource.CLOSED) {
      this.source = null;
      void this.diagnose(url, this.generation);
      return;
    }
    if (this.tokens.enabled && (this.tokens.current !== token || this.tokens.due() || this.tokens.expired(1e3))) {
      this.lost({ immediate: true });
      return;
    }
    if (this.errors >= 2 || !this.connectedOnce) {
      this.lost({ nextUrl: true, error: new HeraldError("network", "the stream could not be re-established") });
      return;
    }
    this.reconnectingByItself();
  }
  /**
   * Asks the same URL with `fetch` what EventSource could not tell: the status and the JSON error (a
   * stream that opens this time is closed at once: the failure passed).
   */
  async diagnose(url, generation) {
    const href = sseUrl(url, this.channels, { token: this.tokens.current, lastEventId: this.cursor });
    let retry;
    const abort = new AbortController();
    try {
      const response = await fetch(href, { headers: { accept: "text/event-stream" }, signal: abort.signal });
      if (response.ok) {
        abort.abort();
        retry = { error: new HeraldError("network", "the stream failed; it opens again") };
      } else {
        retry = await this.refusal(response);
      }
    } catch (error) {
      retry = { nextUrl: true, error: new HeraldError("network", `cannot reach ${url}: ${String(error)}`) };
    }
    if (generation !== this.generation || this.isStopped) return;
    if (retry.error?.fatal) {
      call(this.handlers.onError, retry.error);
      this.fail(retry.error);
      return;
    }
    if (retry.error && retry.error.code !== "network") call(this.handlers.onError, retry.error);
    this.lost(retry);
  }
  /** What to do about a refused stream. */
  async refusal(response) {
    const body = await response.json().catch(() => void 0);
    const code = typeof body?.error?.code === "string" ? body.error.code : `http_${response.status}`;
    const text = typeof body?.error?.message === "string" ? body.error.message : response.statusText;
    const retryAfter = Number(response.headers.get("retry-after"));
    const floorMs = Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1e3 : 0;
    const several = this.sse.urls.length > 1;
    const status = response.status;
    if (code === "invalid_cursor") {
      this.cursor = null;
      for (const channel of this.channels) {
        this.tracker.forget(channel);
        call(this.handlers.onReset, channel, null, "cursor_refused");
      }
      return { immediate: true, error: new HeraldError(code, text, { status }) };
    }
    if (code === "unauthenticated" || status === 401) {
      if (!this.tokens.enabled) return { error: new HeraldError(code, text, { status, fatal: true }) };
      const expired = this.tokens.expired();
      this.tokens.invalidate();
      return { immediate: expired, error: new HeraldError(code, text, { status }) };
    }
    if (FATAL_CODES.has(code)) return { error: new HeraldError(code, text, { status, fatal: true }) };
    return { nextUrl: several, floorMs: several ? 0 : floorMs, error: new HeraldError(code, text, { status }) };
  }
};

// src/token.ts
function tokenExpiry(token) {
  if (!token) return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - base64.length % 4) % 4);
    const claims = JSON.parse(atob(padded));
    if (!claims || typeof claims !== "object") return null;
    const exp = claims.exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp * 1e3 : null;
  } catch {
    return null;
  }
}
var TokenSource = class {
  constructor(provider, refreshBeforeMs, now = Date.now) {
    this.provider = provider;
    this.refreshBeforeMs = refreshBeforeMs;
    this.now = now;
    this.token = null;
    this.have = false;
    this.expiresAt = null;
    this.obtainedAt = 0;
    this.pending = null;
  }
  /** Whether there is a `getToken` at all. */
  get enabled() {
    return this.provider !== void 0;
  }
  /** The token last obtained (null: none, or anonymous). */
  get current() {
    return this.token;
  }
  /** When the current token should be replaced (ms since the epoch), or null when it does not expire. */
  refreshAt() {
    if (this.expiresAt === null) return null;
    const lifetime = Math.max(0, this.expiresAt - this.obtainedAt);
    return this.expiresAt - Math.min(this.refreshBeforeMs, lifetime / 2);
  }
  /** True when the current token is due for replacement (or already expired). */
  due() {
    const at = this.refreshAt();
    return at !== null && this.now() >= at;
  }
  /** True when the current token's `exp` has passed (or passes within `withinMs`). */
  expired(withinMs = 0) {
    return this.expiresAt !== null && this.now() + withinMs >= this.expiresAt;
  }
  /** The token to connect with: the current one unless it is due, else a fresh one. */
  async get() {
    if (!this.provider) return null;
    if (this.have && !this.due()) return this.token;
    return this.fresh();
  }
  /** Asks the application for a new token (one call at a time; concurrent callers share it). */
  fresh() {
    if (!this.provider) return Promise.resolve(null);
    if (!this.pending) {
      const provider = this.provider;
      this.pending = (async () => {
        try {
          const value = await provider();
          const token = typeof value === "string" && value !== "" ? value : null;
          this.token = token;
          this.have = true;
          this.obtainedAt = this.now();
          this.expiresAt = tokenExpiry(token);
          return token;
        } finally {
          this.pending = null;
        }
      })();
    }
    return this.pending;
  }
  /** Herald said when the token expires (WebSocket `refreshed`); trust that over the claim. */
  setExpiry(unixSeconds) {
    if (typeof unixSeconds === "number" && Number.isFinite(unixSeconds)) this.expiresAt = unixSeconds * 1e3;
  }
  /** The current token was refused: the next `get` asks for a new one. */
  invalidate() {
    this.have = false;
  }
};

// src/ws.ts
var CHANNEL_FATAL = /* @__PURE__ */ new Set(["invalid_channel", "forbidden", "unauthenticated", "limit_exceeded"]);
var REFRESH_RETRY_MS = 5e3;
var WsSubscription = class {
  constructor(link, channels, handlers) {
    this.link = link;
    this.channels = channels;
    this.handlers = handlers;
    /** Channels announced to this subscription (`onSubscribed`): only those reach it. */
    this.announced = /* @__PURE__ */ new Set();
    this.closed = false;
  }
  get state() {
    return this.closed ? "closed" : this.link.state;
  }
  position(channel) {
    return this.channels.includes(channel) ? this.link.position(channel) : void 0;
  }
  close() {
    if (this.closed) return;
    this.closed = true;
    this.link.detach(this);
  }
};
var WsLink = class extends Link {
  constructor(ws, tokens, onEmpty) {
    super(ws);
    this.ws = ws;
    this.tokens = tokens;
    this.onEmpty = onEmpty;
    this.tracker = new PositionTracker();
    this.channels = /* @__PURE__ */ new Map();
    this.subs = /* @__PURE__ */ new Set();
    this.socket = null;
    this.isOpen = false;
    this.nextId = 1;
    this.pending = /* @__PURE__ */ new Map();
    this.lastFrameAt = 0;
    this.pingTimer = null;
    this.pongTimer = null;
    this.refreshTimer = null;
    this.generation = 0;
    /** Attempts in a row that closed before the socket opened. */
    this.failedOpens = 0;
    this.lastInfo = null;
  }
  position(channel) {
    const held = this.tracker.get(channel);
    return held ? positionOf(held) : void 0;
  }
  /** Adds a subscription; its channels are subscribed on the socket unless another holds them. */
  attach(channels, handlers) {
    const sub = new WsSubscription(this, channels, handlers);
    this.subs.add(sub);
    for (const name of channels) {
      let channel = this.channels.get(name);
      if (!channel) {
        channel = { name, subs: /* @__PURE__ */ new Set(), status: "idle", withSince: false, resetOnConfirm: null, refusals: 0, retry: null };
        this.channels.set(name, channel);
        channel.subs.add(sub);
        if (this.isOpen) this.requestSubscribe(channel);
      } else {
        channel.subs.add(sub);
        if (channel.status === "live") {
          const shared = channel;
          queueMicrotask(() => {
            if (!sub.closed && shared.status === "live" && shared.subs.has(sub)) this.announce(sub, name);
          });
        }
      }
    }
    if (this.state === "closed") queueMicrotask(() => this.start());
    else if (this.lastInfo) {
      const [state, info] = [this.state, this.lastInfo];
      queueMicrotask(() => {
        if (!sub.closed) call(sub.handlers.onState, state, info);
      });
    }
    return sub;
  }
  /** Removes a subscription; channels no other one holds are unsubscribed. */
  detach(sub) {
    if (!this.subs.delete(sub)) return;
    for (const name of sub.channels) {
      const channel = this.channels.get(name);
      if (!channel || !channel.subs.delete(sub) || channel.subs.size > 0) continue;
      this.channels.delete(name);
      this.tracker.forget(name);
      if (channel.retry !== null) clearTimeout(channel.retry);
      if (this.isOpen && channel.status !== "idle") this.send({ op: "unsubscribe", channel: name }, { op: "unsubscribe" });
    }
    call(sub.handlers.onState, "closed", { transport: "ws", url: this.url, attempt: this.backoff.attempt });
    if (this.subs.size === 0) {
      this.stop();
      this.onEmpty();
    }
  }
  emit(state, info) {
    this.lastInfo = info;
    for (const sub of [...this.subs]) call(sub.handlers.onState, state, info);
  }
  errorToAll(error) {
    for (const sub of [...this.subs]) call(sub.handlers.onError, error);
  }
  open(url) {
    const generation = ++this.generation;
    this.tokens.get().then(
      (token) => {
        if (generation === this.generation && !this.isStopped) this.connect(url, token, generation);
      },
      (error) => {
        if (generation !== this.generation) return;
        const failure = new HeraldError("token_error", `getToken failed: ${String(error)}`);
        this.errorToAll(failure);
        this.lost({ error: failure });
      }
    );
  }
  shut() {
    this.generation++;
    this.isOpen = false;
    for (const timer of [this.pingTimer, this.pongTimer, this.refreshTimer]) if (timer !== null) clearTimeout(timer);
    this.pingTimer = this.pongTimer = this.refreshTimer = null;
    this.pending.clear();
    for (const channel of this.channels.values()) {
      channel.status = "idle";
      if (channel.retry !== null) clearTimeout(channel.retry);
      channel.retry = null;
    }
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try {
        socket.close(1e3);
      } catch {
      }
    }
  }
  connect(url, token, generation) {
    const href = wsUrl(url, { token });
    let socket;
    try {
      socket = new this.ws.WebSocket(href);
    } catch (error) {
      this.fail(new HeraldError("bad_request", `cannot open ${href}: ${String(error)}`, { fatal: true }));
      return;
    }
    this.socket = socket;
    const live = () => generation === this.generation && this.socket === socket;
    socket.onopen = () => {
      if (!live()) return;
      this.isOpen = true;
      this.failedOpens = 0;
      this.lastFrameAt = Date.now();
      this.opened();
      for (const channel of this.channels.values()) this.requestSubscribe(channel);
      this.armPing();
      this.scheduleRefresh();
    };
    socket.onmessage = (event) => {
      if (!live()) return;
      this.lastFrameAt = Date.now();
      this.onFrame(parseJson(event.data));
    };
    socket.onerror = () => {
    };
    socket.onclose = (event) => {
      if (live()) this.onClose(event.code, event.reason, token);
    };
  }
  send(frame, pending) {
    if (!this.socket || !this.isOpen) return null;
    const id = this.nextId++;
    this.pending.set(id, pending);
    try {
      this.socket.send(JSON.stringify({ ...frame, id }));
    } catch {
      this.pending.delete(id);
      return null;
    }
    return id;
  }
  requestSubscribe(channel) {
    if (!this.socket || !this.isOpen) return;
    if (channel.retry !== null) clearTimeout(channel.retry);
    channel.retry = null;
    const since = this.tracker.get(channel.name);
    const id = this.nextId++;
    this.pending.set(id, { op: "subscribe", channel });
    channel.status = "subscribing";
    channel.withSince = since !== void 0;
    try {
      this.socket.send(subscribeFrame(id, channel.name, since));
    } catch {
      this.pending.delete(id);
      channel.status = "idle";
    }
  }
  announce(sub, name) {
    if (sub.announced.has(name)) return;
    sub.announced.add(name);
    const held = this.tracker.get(name);
    call(sub.handlers.onSubscribed, name, held ? positionOf(held) : null);
  }
  onFrame(frame) {
    if (!frame || typeof frame !== "object") return;
    const type = frame.type;
    const id = frame.id;
    const pending = typeof id === "number" ? this.pending.get(id) : void 0;
    if (typeof id === "number" && type !== "message" && type !== "reset") this.pending.delete(id);
    switch (type) {
      case "message":
        if (isEnvelope(frame)) this.onMessage(frame);
        break;
      case "reset":
        if (isResetNotice(frame)) this.onReset(frame.channel, positionOf(frame), frame.reason);
        break;
      case "subscribed":
        if (pending?.op === "subscribe" && isPosition(frame)) this.onSubscribed(pending.channel, positionOf(frame));
        break;
      case "unsubscribed":
        this.onUnsubscribed(frame);
        break;
      case "refreshed":
        this.tokens.setExpiry(frame.expires_at);
        this.scheduleRefresh();
        break;
      case "pong":
        if (this.pongTimer !== null) clearTimeout(this.pongTimer);
        this.pongTimer = null;
        break;
      case "error":
        this.onError(frame, pending);
        break;
      default:
    }
  }
  onMessage(message) {
    const channel = this.channels.get(message.channel);
    if (!channel) return;
    if (channel.status === "subscribing" && !channel.withSince) return;
    const verdict = this.tracker.accept(message);
    if (verdict.kind === "duplicate" || verdict.kind === "stale") return;
    if (verdict.kind === "reset-then-deliver") this.deliverReset(channel, positionOf(verdict.position), verdict.reason);
    for (const sub of [...channel.subs]) {
      if (sub.announced.has(channel.name)) call(sub.handlers.onMessage, message);
    }
  }
  onReset(name, position, reason) {
    const channel = this.channels.get(name);
    if (!channel) return;
    this.tracker.reset(name, position);
    this.deliverReset(channel, position, reason);
  }
  deliverReset(channel, position, reason) {
    for (const sub of [...channel.subs]) {
      if (sub.announced.has(channel.name)) call(sub.handlers.onReset, channel.name, positionOf(position), reason);
    }
  }
  onSubscribed(channel, position) {
    if (this.channels.get(channel.name) !== channel) return;
    channel.status = "live";
    channel.refusals = 0;
    const unexpected = this.tracker.confirm(channel.name, position);
    const reason = channel.resetOnConfirm ?? unexpected;
    channel.resetOnConfirm = null;
    if (reason) this.deliverReset(channel, position, reason);
    for (const sub of [...channel.subs]) this.announce(sub, channel.name);
  }
  onUnsubscribed(frame) {
    if (frame.reason === void 0 || typeof frame.channel !== "string") return;
    const channel = this.channels.get(frame.channel);
    if (!channel) return;
    this.channels.delete(channel.name);
    this.tracker.forget(channel.name);
    const error = new HeraldError(String(frame.reason), `Herald ended the subscription to ${channel.name}`, {
      channel: channel.name,
      fatal: true
    });
    for (const sub of [...channel.subs]) call(sub.handlers.onError, error);
  }
  onError(frame, pending) {
    const code = typeof frame.code === "string" ? frame.code : "error";
    const text = typeof frame.message === "string" ? frame.message : code;
    if (pending?.op === "subscribe") {
      this.onSubscribeRefused(pending.channel, code, text);
      return;
    }
    if (pending?.op === "unsubscribe") return;
    if (pending?.op === "refresh") {
      this.tokens.invalidate();
      this.errorToAll(new HeraldError(code, `refresh refused: ${text}`));
      this.retryRefreshLater();
      return;
    }
    this.errorToAll(new HeraldError(code, text));
  }
  onSubscribeRefused(channel, code, text) {
    if (this.channels.get(channel.name) !== channel) return;
    channel.status = "idle";
    if (code === "invalid_cursor") {
      this.tracker.forget(channel.name);
      channel.resetOnConfirm = "history_gone";
      this.requestSubscribe(channel);
      return;
    }
    const error = new HeraldError(code, text, { channel: channel.name, fatal: CHANNEL_FATAL.has(code) });
    for (const sub of [...channel.subs]) call(sub.handlers.onError, error);
    if (error.fatal) {
      this.channels.delete(channel.name);
      this.tracker.forget(channel.name);
      return;
    }
    channel.refusals += 1;
    channel.retry = setTimeout(
      () => {
        channel.retry = null;
        if (this.channels.get(channel.name) === channel && channel.status === "idle") this.requestSubscribe(channel);
      },
      backoffDelay(channel.refusals, this.ws)
    );
  }
  onClose(code, reason, token) {
    const wasOpen = this.isOpen;
    const error = new HeraldError(`closed_${code}`, reason || `the socket closed (${code})`);
    let retry;
    switch (code) {
      case 1001:
        retry = { drain: true, nextUrl: true, error };
        break;
      case 4e3:
      // slow_consumer: nothing is lost, resume
      case 4002:
        retry = { drain: true, error };
        break;
      case 4001:
        this.tokens.invalidate();
        retry = { error };
        break;
      case 4003:
        this.tokens.invalidate();
        retry = { immediate: true, error };
        break;
      default:
        if (!wasOpen) {
          this.failedOpens += 1;
          if (this.tokens.expired() || this.failedOpens >= 2) {
            if (this.tokens.current === token) this.tokens.invalidate();
          }
        }
        retry = { nextUrl: true, error };
    }
    this.lost(retry);
  }
  // ---- Keeping the socket honest: pings when idle, tokens replaced before they expire ----------
  armPing() {
    const every = this.ws.pingIntervalMs;
    if (every <= 0) return;
    const wait = Math.max(0, this.lastFrameAt + every - Date.now());
    this.pingTimer = setTimeout(() => {
      this.pingTimer = null;
      if (!this.isOpen) return;
      if (Date.now() - this.lastFrameAt >= every) this.ping();
      this.armPing();
    }, wait);
  }
  /** Sends `ping`; without a `pong` in time the socket is taken for dead and replaced. */
  ping() {
    if (this.pongTimer !== null || !this.isOpen) return;
    if (this.send({ op: "ping" }, { op: "ping" }) === null) return;
    const generation = this.generation;
    this.pongTimer = setTimeout(() => {
      this.pongTimer = null;
      if (generation !== this.generation) return;
      this.lost({ immediate: true, nextUrl: true, error: new HeraldError("pong_timeout", "no pong from Herald") });
    }, this.ws.pongTimeoutMs);
  }
  scheduleRefresh() {
    if (this.refreshTimer !== null) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    const at = this.tokens.refreshAt();
    if (at === null || !this.tokens.enabled) return;
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(0, at - Date.now()));
  }
  retryRefreshLater() {
    if (this.refreshTimer !== null) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (!this.isOpen || this.tokens.expired()) return;
    this.refreshTimer = setTimeout(() => void this.refresh(), REFRESH_RETRY_MS);
  }
  /** Asks the application for a fresh token and hands it to Herald on the open socket. */
  async refresh() {
    this.refreshTimer = null;
    const generation = this.generation;
    let token;
    try {
      token = await this.tokens.fresh();
    } catch (error) {
      if (generation !== this.generation) return;
      this.errorToAll(new HeraldError("token_error", `getToken failed: ${String(error)}`));
      this.retryRefreshLater();
      return;
    }
    if (generation !== this.generation || !this.isOpen) return;
    if (token === null) return;
    this.send({ op: "refresh", token }, { op: "refresh" });
  }
  onVisible() {
    if (!this.isOpen) return;
    if (this.tokens.enabled && this.tokens.due() && this.refreshTimer !== null) {
      clearTimeout(this.refreshTimer);
      void this.refresh();
    }
    if (this.ws.pingIntervalMs > 0) this.ping();
  }
};

// src/client.ts
var CHANNEL_NAME = /^[A-Za-z0-9_\-:.@=/]{1,255}$/;
function isChannelName(name) {
  return typeof name === "string" && CHANNEL_NAME.test(name);
}
var DEFAULTS = {
  transport: "sse",
  refreshBeforeMs: 3e4,
  minDelayMs: 500,
  maxDelayMs: 15e3,
  drainJitterMs: 500,
  pingIntervalMs: 2e4,
  pongTimeoutMs: 1e4
};
var HeraldClient = class {
  constructor(options = {}) {
    this.open = /* @__PURE__ */ new Set();
    this.ws = null;
    this.options = options;
    this.transport = options.transport ?? DEFAULTS.transport;
    if (this.transport !== "sse" && this.transport !== "ws") {
      throw new HeraldError("bad_request", `unknown transport ${String(this.transport)}`, { fatal: true });
    }
    this.tokens = new TokenSource(options.getToken, options.refreshBeforeMs ?? DEFAULTS.refreshBeforeMs);
  }
  linkSettings() {
    const o = this.options;
    const urls = o.url === void 0 ? [""] : typeof o.url === "string" ? [o.url] : [...o.url];
    if (urls.length === 0) throw new HeraldError("bad_request", "no Herald URL given", { fatal: true });
    return {
      transport: this.transport,
      urls,
      minDelayMs: o.minDelayMs ?? DEFAULTS.minDelayMs,
      maxDelayMs: o.maxDelayMs ?? DEFAULTS.maxDelayMs,
      drainJitterMs: o.drainJitterMs ?? DEFAULTS.drainJitterMs,
      pauseWhenHiddenMs: o.pauseWhenHiddenMs ?? null,
      random: o.random ?? Math.random,
      signals: pageSignals()
    };
  }
  /**
   * Subscribes to `channels` (one name or several). Over SSE each call opens its own stream; over
   * WebSocket every call shares the client's one socket, and channels can be added (another call) and
   * removed (`close`) while it runs.
   */
  subscribe(channels, handlers = {}) {
    const names = [...new Set(typeof channels === "string" ? [channels] : channels)];
    if (names.length === 0) throw new HeraldError("bad_request", "subscribe needs at least one channel", { fatal: true });
    for (const name of names) {
      if (!isChannelName(name)) {
        throw new HeraldError("invalid_channel", `invalid channel name ${JSON.stringify(name)}`, {
          channel: String(name),
          fatal: true
        });
      }
    }
    const any = handlers;
    let subscription;
    if (this.transport === "sse") {
      const EventSourceClass = this.options.EventSource ?? globalThis.EventSource;
      if (!EventSourceClass) throw new HeraldError("bad_request", "no EventSource here: pass options.EventSource");
      const settings = { ...this.linkSettings(), events: this.options.events ?? [], EventSource: EventSourceClass };
      const sse = new SseSubscription(settings, names, any, this.tokens);
      queueMicrotask(() => sse.start());
      subscription = sse;
    } else {
      subscription = this.socket().attach(names, any);
    }
    this.open.add(subscription);
    const close = subscription.close.bind(subscription);
    subscription.close = () => {
      this.open.delete(subscription);
      close();
    };
    return subscription;
  }
  socket() {
    if (!this.ws) {
      const WebSocketClass = this.options.WebSocket ?? globalThis.WebSocket;
      if (!WebSocketClass) throw new HeraldError("bad_request", "no WebSocket here: pass options.WebSocket");
      const settings = {
        ...this.linkSettings(),
        WebSocket: WebSocketClass,
        pingIntervalMs: this.options.pingIntervalMs ?? DEFAULTS.pingIntervalMs,
        pongTimeoutMs: this.options.pongTimeoutMs ?? DEFAULTS.pongTimeoutMs
      };
      const link = new WsLink(settings, this.tokens, () => {
        if (this.ws === link) this.ws = null;
      });
      this.ws = link;
    }
    return this.ws;
  }
  /** Closes every subscription of this client. */
  close() {
    for (const subscription of [...this.open]) subscription.close();
  }
};
function createClient(options = {}) {
  return new HeraldClient(options);
}

// src/reconcile.ts
var MAX_BEHIND = 3;
function before(message) {
  return { epoch: message.epoch, offset: message.offset - 1 };
}
function lacks(position, next) {
  if (!next || next.epoch !== position.epoch || next.offset <= position.offset) return null;
  return next;
}
function reconcile(options) {
  const channels = /* @__PURE__ */ new Map();
  const maxBuffered = options.maxBuffered ?? 1e4;
  const retryDelay = { minDelayMs: options.retryDelayMs ?? 1e3, maxDelayMs: 3e4, random: Math.random };
  let disposed = false;
  function record(channel) {
    let load = channels.get(channel);
    if (!load) {
      load = {
        loading: false,
        generation: 0,
        controller: null,
        buffer: [],
        again: false,
        failures: 0,
        retry: null,
        floor: null,
        start: null,
        unchecked: false,
        behind: 0
      };
      channels.set(channel, load);
    }
    return load;
  }
  function stop(load) {
    load.generation++;
    load.controller?.abort();
    load.controller = null;
    if (load.retry !== null) clearTimeout(load.retry);
    load.retry = null;
  }
  function start(channel, cause, fresh) {
    if (disposed) return;
    const load = record(channel);
    stop(load);
    if (fresh) {
      load.buffer = [];
      load.failures = 0;
      load.floor = null;
      load.behind = 0;
    }
    load.unchecked = false;
    load.loading = true;
    load.again = false;
    const generation = load.generation;
    const controller = new AbortController();
    load.controller = controller;
    let pending;
    try {
      pending = Promise.resolve(options.fetch(channel, controller.signal, cause));
    } catch (error) {
      pending = Promise.reject(error);
    }
    pending.then(
      (snapshot) => {
        if (disposed || load.generation !== generation) return;
        load.controller = null;
        if (load.again) {
          start(channel, "retry", true);
          return;
        }
        land(channel, load, snapshot);
      },
      (error) => {
        if (disposed || load.generation !== generation) return;
        load.controller = null;
        load.failures += 1;
        const delay = backoffDelay(load.failures, retryDelay);
        call(
          options.onError,
          new HeraldError("fetch_failed", `loading ${channel} failed (retry in ${delay} ms): ${String(error)}`, {
            channel
          })
        );
        load.retry = setTimeout(() => {
          load.retry = null;
          if (load.generation === generation) start(channel, "retry", load.again);
        }, delay);
      }
    );
  }
  function land(channel, load, snapshot) {
    const position = snapshot && snapshot.position ? { epoch: snapshot.position.epoch, offset: snapshot.position.offset } : null;
    const first = position ? load.buffer.find((m) => !isCovered(m, position)) : void 0;
    const missing = position ? lacks(position, load.start) || first && lacks(position, before(first)) : null;
    if (missing && load.behind < MAX_BEHIND) {
      behind(channel, load, position, missing);
      return;
    }
    load.behind = 0;
    load.unchecked = !missing && position !== null && first === void 0;
    load.loading = false;
    load.failures = 0;
    load.floor = position;
    const held = load.buffer;
    load.buffer = [];
    try {
      options.onSnapshot(channel, snapshot?.state, position);
    } catch (error) {
      report(error);
    }
    for (const message of held) deliver(load, message);
  }
  function behind(channel, load, position, missing) {
    load.behind += 1;
    const delay = backoffDelay(load.behind, retryDelay);
    call(
      options.onError,
      new HeraldError(
        "snapshot_behind",
        `the state of ${channel} is at ${position.epoch}:${position.offset}, the stream goes on after ${missing.epoch}:${missing.offset}: loading it again in ${delay} ms`,
        { channel }
      )
    );
    stop(load);
    load.loading = true;
    load.unchecked = false;
    const generation = load.generation;
    load.retry = setTimeout(() => {
      load.retry = null;
      if (load.generation === generation) start(channel, "retry", false);
    }, delay);
  }
  function deliver(load, message) {
    if (isCovered(message, load.floor)) return;
    if (load.unchecked) {
      load.unchecked = false;
      const missing = load.floor ? lacks(load.floor, before(message)) : null;
      if (missing && load.behind < MAX_BEHIND) {
        const channel = message.channel;
        behind(channel, load, load.floor, missing);
        load.buffer.push(message);
        return;
      }
    }
    call(options.onMessage, message);
  }
  const handlers = {
    onSubscribed(channel, position) {
      call(options.onSubscribed, channel, position);
      if (channels.has(channel)) return;
      record(channel).start = position ? { epoch: position.epoch, offset: position.offset } : null;
      start(channel, "subscribed", true);
    },
    onReset(channel, position, reason) {
      call(options.onReset, channel, position, reason);
      record(channel).start = position ? { epoch: position.epoch, offset: position.offset } : null;
      start(channel, "reset", true);
    },
    onMessage(message) {
      const load = channels.get(message.channel);
      if (!load) {
        call(options.onMessage, message);
        return;
      }
      if (!load.loading) {
        deliver(load, message);
        return;
      }
      if (load.buffer.length >= maxBuffered) {
        load.buffer = [];
        load.again = true;
        return;
      }
      load.buffer.push(message);
    },
    onState(state, info) {
      call(options.onState, state, info);
      if (state === "closed") handlers.dispose();
    },
    onError(error) {
      call(options.onError, error);
    },
    loading(channel) {
      return channels.get(channel)?.loading ?? false;
    },
    dispose() {
      disposed = true;
      for (const load of channels.values()) stop(load);
      channels.clear();
    }
  };
  return handlers;
}
export {
  Backoff,
  DEFAULTS,
  HeraldClient,
  HeraldError,
  PositionTracker,
  TokenSource,
  backoffDelay,
  comparePositions,
  createClient,
  drainDelay,
  isChannelName,
  isCovered,
  isPosition,
  reconcile,
  resolveBase,
  sseUrl,
  tokenExpiry,
  wsUrl
};
