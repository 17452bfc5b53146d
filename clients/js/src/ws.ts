// Every `subscribe` of a client over one WebSocket on `/v1/ws`. Channels are subscribed and
// unsubscribed on the open socket as subscriptions come and go; after a reconnect each is subscribed
// again `since` the position last handed to the application, so Herald replays what was missed or
// sends a reset. The token is replaced on the open socket (`refresh`) before it expires.

import { backoffDelay } from './backoff.js';
import { call, isEnvelope, isResetNotice, parseJson, positionOf } from './dispatch.js';
import { Link, type LinkSettings, type Retry } from './link.js';
import { isPosition, PositionTracker } from './position.js';
import type { TokenSource } from './token.js';
import {
  type ConnectionState,
  HeraldError,
  type Handlers,
  type Message,
  type Position,
  type ResetReason,
  type StateInfo,
  type Subscription,
} from './types.js';
import { subscribeFrame, wsUrl } from './urls.js';

export interface WsSettings extends LinkSettings {
  readonly WebSocket: typeof WebSocket;
  readonly pingIntervalMs: number;
  readonly pongTimeoutMs: number;
}

/** Subscribe error codes that end the channel (the others are retried). */
const CHANNEL_FATAL = new Set(['invalid_channel', 'forbidden', 'unauthenticated', 'limit_exceeded']);
/** How long to wait before asking again for a token that `getToken` or `refresh` refused. */
const REFRESH_RETRY_MS = 5000;

interface Channel {
  readonly name: string;
  readonly subs: Set<WsSubscription>;
  /** idle: not asked on this socket; subscribing: asked, not confirmed; live: confirmed. */
  status: 'idle' | 'subscribing' | 'live';
  /** The subscribe request was sent with `since` (replays before `subscribed` belong to it). */
  withSince: boolean;
  /** A reset the application must hear when the subscription is confirmed. */
  resetOnConfirm: ResetReason | null;
  /** Attempts refused with `engine_unavailable`. */
  refusals: number;
  retry: ReturnType<typeof setTimeout> | null;
}

type Pending = { op: 'subscribe'; channel: Channel } | { op: 'unsubscribe' } | { op: 'refresh' } | { op: 'ping' };

/** One `subscribe` call over the client's socket. */
export class WsSubscription implements Subscription {
  /** Channels announced to this subscription (`onSubscribed`): only those reach it. */
  readonly announced = new Set<string>();
  closed = false;

  constructor(
    private readonly link: WsLink,
    readonly channels: readonly string[],
    readonly handlers: Handlers,
  ) {}

  get state(): ConnectionState {
    return this.closed ? 'closed' : this.link.state;
  }

  position(channel: string): Position | undefined {
    return this.channels.includes(channel) ? this.link.position(channel) : undefined;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.link.detach(this);
  }
}

export class WsLink extends Link {
  private readonly tracker = new PositionTracker();
  private readonly channels = new Map<string, Channel>();
  private readonly subs = new Set<WsSubscription>();
  private socket: WebSocket | null = null;
  private isOpen = false;
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private lastFrameAt = 0;
  private pingTimer: ReturnType<typeof setTimeout> | null = null;
  private pongTimer: ReturnType<typeof setTimeout> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private generation = 0;
  /** Attempts in a row that closed before the socket opened. */
  private failedOpens = 0;
  private lastInfo: StateInfo | null = null;

  constructor(
    private readonly ws: WsSettings,
    private readonly tokens: TokenSource,
    /** Called once the last subscription left (the client drops this link). */
    private readonly onEmpty: () => void,
  ) {
    super(ws);
  }

  position(channel: string): Position | undefined {
    const held = this.tracker.get(channel);
    return held ? positionOf(held) : undefined;
  }

  /** Adds a subscription; its channels are subscribed on the socket unless another holds them. */
  attach(channels: readonly string[], handlers: Handlers): WsSubscription {
    const sub = new WsSubscription(this, channels, handlers);
    this.subs.add(sub);
    for (const name of channels) {
      let channel = this.channels.get(name);
      if (!channel) {
        channel = { name, subs: new Set(), status: 'idle', withSince: false, resetOnConfirm: null, refusals: 0, retry: null };
        this.channels.set(name, channel);
        channel.subs.add(sub);
        if (this.isOpen) this.requestSubscribe(channel);
      } else {
        channel.subs.add(sub);
        if (channel.status === 'live') {
          // Already flowing for another subscription: this one starts where the channel is now.
          const shared = channel;
          queueMicrotask(() => {
            if (!sub.closed && shared.status === 'live' && shared.subs.has(sub)) this.announce(sub, name);
          });
        }
      }
    }
    // Handlers are never called from inside `subscribe`: the socket opens right after it returns.
    if (this.state === 'closed') queueMicrotask(() => this.start());
    else if (this.lastInfo) {
      const [state, info] = [this.state, this.lastInfo];
      queueMicrotask(() => {
        if (!sub.closed) call(sub.handlers.onState, state, info);
      });
    }
    return sub;
  }

  /** Removes a subscription; channels no other one holds are unsubscribed. */
  detach(sub: WsSubscription): void {
    if (!this.subs.delete(sub)) return;
    for (const name of sub.channels) {
      const channel = this.channels.get(name);
      if (!channel || !channel.subs.delete(sub) || channel.subs.size > 0) continue;
      this.channels.delete(name);
      this.tracker.forget(name);
      if (channel.retry !== null) clearTimeout(channel.retry);
      if (this.isOpen && channel.status !== 'idle') this.send({ op: 'unsubscribe', channel: name }, { op: 'unsubscribe' });
    }
    call(sub.handlers.onState, 'closed', { transport: 'ws', url: this.url, attempt: this.backoff.attempt });
    if (this.subs.size === 0) {
      this.stop();
      this.onEmpty();
    }
  }

  protected emit(state: ConnectionState, info: StateInfo): void {
    this.lastInfo = info;
    for (const sub of [...this.subs]) call(sub.handlers.onState, state, info);
  }

  private errorToAll(error: HeraldError): void {
    for (const sub of [...this.subs]) call(sub.handlers.onError, error);
  }

  protected open(url: string): void {
    const generation = ++this.generation;
    this.tokens.get().then(
      (token) => {
        if (generation === this.generation && !this.isStopped) this.connect(url, token, generation);
      },
      (error: unknown) => {
        if (generation !== this.generation) return;
        const failure = new HeraldError('token_error', `getToken failed: ${String(error)}`);
        this.errorToAll(failure);
        this.lost({ error: failure });
      },
    );
  }

  protected shut(): void {
    this.generation++;
    this.isOpen = false;
    for (const timer of [this.pingTimer, this.pongTimer, this.refreshTimer]) if (timer !== null) clearTimeout(timer);
    this.pingTimer = this.pongTimer = this.refreshTimer = null;
    this.pending.clear();
    for (const channel of this.channels.values()) {
      channel.status = 'idle';
      if (channel.retry !== null) clearTimeout(channel.retry);
      channel.retry = null;
    }
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try {
        socket.close(1000);
      } catch {
        // Already closing.
      }
    }
  }

  private connect(url: string, token: string | null, generation: number): void {
    const href = wsUrl(url, { token });
    let socket: WebSocket;
    try {
      socket = new this.ws.WebSocket(href);
    } catch (error) {
      this.fail(new HeraldError('bad_request', `cannot open ${href}: ${String(error)}`, { fatal: true }));
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
    socket.onmessage = (event: MessageEvent) => {
      if (!live()) return;
      this.lastFrameAt = Date.now();
      this.onFrame(parseJson(event.data));
    };
    socket.onerror = () => {
      // A close event follows with the details.
    };
    socket.onclose = (event: CloseEvent) => {
      if (live()) this.onClose(event.code, event.reason, token);
    };
  }

  private send(frame: Record<string, unknown>, pending: Pending): number | null {
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

  private requestSubscribe(channel: Channel): void {
    if (!this.socket || !this.isOpen) return;
    if (channel.retry !== null) clearTimeout(channel.retry);
    channel.retry = null;
    const since = this.tracker.get(channel.name);
    const id = this.nextId++;
    this.pending.set(id, { op: 'subscribe', channel });
    channel.status = 'subscribing';
    channel.withSince = since !== undefined;
    try {
      this.socket.send(subscribeFrame(id, channel.name, since));
    } catch {
      this.pending.delete(id);
      channel.status = 'idle';
    }
  }

  private announce(sub: WsSubscription, name: string): void {
    if (sub.announced.has(name)) return;
    sub.announced.add(name);
    const held = this.tracker.get(name);
    call(sub.handlers.onSubscribed, name, held ? positionOf(held) : null);
  }

  private onFrame(frame: unknown): void {
    if (!frame || typeof frame !== 'object') return;
    const type = (frame as { type?: unknown }).type;
    const id = (frame as { id?: unknown }).id;
    const pending = typeof id === 'number' ? this.pending.get(id) : undefined;
    if (typeof id === 'number' && type !== 'message' && type !== 'reset') this.pending.delete(id);
    switch (type) {
      case 'message':
        if (isEnvelope(frame)) this.onMessage(frame);
        break;
      case 'reset':
        if (isResetNotice(frame)) this.onReset(frame.channel, positionOf(frame), frame.reason);
        break;
      case 'subscribed':
        if (pending?.op === 'subscribe' && isPosition(frame)) this.onSubscribed(pending.channel, positionOf(frame));
        break;
      case 'unsubscribed':
        this.onUnsubscribed(frame as { channel?: unknown; reason?: unknown });
        break;
      case 'refreshed':
        this.tokens.setExpiry((frame as { expires_at?: unknown }).expires_at as number | null);
        this.scheduleRefresh();
        break;
      case 'pong':
        if (this.pongTimer !== null) clearTimeout(this.pongTimer);
        this.pongTimer = null;
        break;
      case 'error':
        this.onError(frame as { code?: unknown; message?: unknown }, pending);
        break;
      default:
      // Protocol version 2 only adds: ignore what this client does not know.
    }
  }

  private onMessage(message: Message): void {
    const channel = this.channels.get(message.channel);
    if (!channel) return;
    // Without `since`, Herald confirms before it delivers anything: a publication seen before the
    // confirmation belongs to an earlier subscription of this channel on this socket.
    if (channel.status === 'subscribing' && !channel.withSince) return;
    const verdict = this.tracker.accept(message);
    if (verdict.kind === 'duplicate' || verdict.kind === 'stale') return;
    if (verdict.kind === 'reset-then-deliver') this.deliverReset(channel, positionOf(verdict.position), verdict.reason);
    for (const sub of [...channel.subs]) {
      if (sub.announced.has(channel.name)) call(sub.handlers.onMessage, message);
    }
  }

  private onReset(name: string, position: Position, reason: string): void {
    const channel = this.channels.get(name);
    if (!channel) return;
    this.tracker.reset(name, position);
    this.deliverReset(channel, position, reason);
  }

  private deliverReset(channel: Channel, position: Position, reason: ResetReason): void {
    for (const sub of [...channel.subs]) {
      if (sub.announced.has(channel.name)) call(sub.handlers.onReset, channel.name, positionOf(position), reason);
    }
  }

  private onSubscribed(channel: Channel, position: Position): void {
    if (this.channels.get(channel.name) !== channel) return;
    channel.status = 'live';
    channel.refusals = 0;
    const unexpected = this.tracker.confirm(channel.name, position);
    const reason = channel.resetOnConfirm ?? unexpected;
    channel.resetOnConfirm = null;
    if (reason) this.deliverReset(channel, position, reason);
    for (const sub of [...channel.subs]) this.announce(sub, channel.name);
  }

  private onUnsubscribed(frame: { channel?: unknown; reason?: unknown }): void {
    if (frame.reason === undefined || typeof frame.channel !== 'string') return;
    // Herald ended the subscription itself (a refreshed token no longer grants it).
    const channel = this.channels.get(frame.channel);
    if (!channel) return;
    this.channels.delete(channel.name);
    this.tracker.forget(channel.name);
    const error = new HeraldError(String(frame.reason), `Herald ended the subscription to ${channel.name}`, {
      channel: channel.name,
      fatal: true,
    });
    for (const sub of [...channel.subs]) call(sub.handlers.onError, error);
  }

  private onError(frame: { code?: unknown; message?: unknown }, pending: Pending | undefined): void {
    const code = typeof frame.code === 'string' ? frame.code : 'error';
    const text = typeof frame.message === 'string' ? frame.message : code;
    if (pending?.op === 'subscribe') {
      this.onSubscribeRefused(pending.channel, code, text);
      return;
    }
    if (pending?.op === 'unsubscribe') return; // not subscribed (any more): nothing to undo
    if (pending?.op === 'refresh') {
      this.tokens.invalidate();
      this.errorToAll(new HeraldError(code, `refresh refused: ${text}`));
      this.retryRefreshLater();
      return;
    }
    this.errorToAll(new HeraldError(code, text));
  }

  private onSubscribeRefused(channel: Channel, code: string, text: string): void {
    if (this.channels.get(channel.name) !== channel) return;
    channel.status = 'idle';
    if (code === 'invalid_cursor') {
      // The epoch held is not one Herald accepts: start over at the top, and say so once confirmed.
      this.tracker.forget(channel.name);
      channel.resetOnConfirm = 'history_gone';
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
        if (this.channels.get(channel.name) === channel && channel.status === 'idle') this.requestSubscribe(channel);
      },
      backoffDelay(channel.refusals, this.ws),
    );
  }

  private onClose(code: number, reason: string, token: string | null): void {
    const wasOpen = this.isOpen;
    const error = new HeraldError(`closed_${code}`, reason || `the socket closed (${code})`);
    let retry: Retry;
    switch (code) {
      case 1001: // shutting_down: another node, soon (Herald spreads these closes over its drain window)
        retry = { drain: true, nextUrl: true, error };
        break;
      case 4000: // slow_consumer: nothing is lost, resume
      case 4002: // ping_timeout
        retry = { drain: true, error };
        break;
      case 4001: // disconnected by the server API: come back only with a token that is still good
        this.tokens.invalidate();
        retry = { error };
        break;
      case 4003: // token_expired
        this.tokens.invalidate();
        retry = { immediate: true, error };
        break;
      default:
        if (!wasOpen) {
          // Refused before the upgrade (Herald's reason, 401 or 503, does not reach the page): maybe
          // the token; after two refusals in a row, ask for a fresh one.
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

  private armPing(): void {
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
  private ping(): void {
    if (this.pongTimer !== null || !this.isOpen) return;
    if (this.send({ op: 'ping' }, { op: 'ping' }) === null) return;
    const generation = this.generation;
    this.pongTimer = setTimeout(() => {
      this.pongTimer = null;
      if (generation !== this.generation) return;
      this.lost({ immediate: true, nextUrl: true, error: new HeraldError('pong_timeout', 'no pong from Herald') });
    }, this.ws.pongTimeoutMs);
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer !== null) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    const at = this.tokens.refreshAt();
    if (at === null || !this.tokens.enabled) return;
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(0, at - Date.now()));
  }

  private retryRefreshLater(): void {
    if (this.refreshTimer !== null) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (!this.isOpen || this.tokens.expired()) return; // the close (4003) brings a reconnect
    this.refreshTimer = setTimeout(() => void this.refresh(), REFRESH_RETRY_MS);
  }

  /** Asks the application for a fresh token and hands it to Herald on the open socket. */
  private async refresh(): Promise<void> {
    this.refreshTimer = null;
    const generation = this.generation;
    let token: string | null;
    try {
      token = await this.tokens.fresh();
    } catch (error) {
      if (generation !== this.generation) return;
      this.errorToAll(new HeraldError('token_error', `getToken failed: ${String(error)}`));
      this.retryRefreshLater();
      return;
    }
    if (generation !== this.generation || !this.isOpen) return;
    if (token === null) return; // no token to give: Herald closes at expiry and the client reconnects
    this.send({ op: 'refresh', token }, { op: 'refresh' });
  }

  protected override onVisible(): void {
    if (!this.isOpen) return;
    // Timers of hidden pages run late: refresh an overdue token, and check the socket still works.
    if (this.tokens.enabled && this.tokens.due() && this.refreshTimer !== null) {
      clearTimeout(this.refreshTimer);
      void this.refresh();
    }
    if (this.ws.pingIntervalMs > 0) this.ping();
  }
}
