// The entry point: `createClient(options)` and its `subscribe`.

import { type LinkSettings, pageSignals } from './link.js';
import { SseSubscription } from './sse.js';
import { TokenSource } from './token.js';
import { type ClientOptions, type Handlers, HeraldError, type Subscription, type Transport } from './types.js';
import { WsLink } from './ws.js';

/** Channel names as docs/protocol.md allows them: 1 to 255 bytes of `A-Z a-z 0-9 _ - : . @ = /`. */
const CHANNEL_NAME = /^[A-Za-z0-9_\-:.@=/]{1,255}$/;

export function isChannelName(name: unknown): name is string {
  return typeof name === 'string' && CHANNEL_NAME.test(name);
}

/** The defaults of every option (see `ClientOptions`). */
export const DEFAULTS = {
  transport: 'sse' as Transport,
  refreshBeforeMs: 30_000,
  minDelayMs: 500,
  maxDelayMs: 15_000,
  drainJitterMs: 500,
  pingIntervalMs: 20_000,
  pongTimeoutMs: 10_000,
} as const;

export class HeraldClient {
  readonly transport: Transport;
  private readonly options: ClientOptions;
  private readonly tokens: TokenSource;
  private readonly open = new Set<Subscription>();
  private ws: WsLink | null = null;

  constructor(options: ClientOptions = {}) {
    this.options = options;
    this.transport = options.transport ?? DEFAULTS.transport;
    if (this.transport !== 'sse' && this.transport !== 'ws') {
      throw new HeraldError('bad_request', `unknown transport ${String(this.transport)}`, { fatal: true });
    }
    this.tokens = new TokenSource(options.getToken, options.refreshBeforeMs ?? DEFAULTS.refreshBeforeMs);
  }

  private linkSettings(): LinkSettings {
    const o = this.options;
    const urls = o.url === undefined ? [''] : typeof o.url === 'string' ? [o.url] : [...o.url];
    if (urls.length === 0) throw new HeraldError('bad_request', 'no Herald URL given', { fatal: true });
    return {
      transport: this.transport,
      urls,
      minDelayMs: o.minDelayMs ?? DEFAULTS.minDelayMs,
      maxDelayMs: o.maxDelayMs ?? DEFAULTS.maxDelayMs,
      drainJitterMs: o.drainJitterMs ?? DEFAULTS.drainJitterMs,
      pauseWhenHiddenMs: o.pauseWhenHiddenMs ?? null,
      random: o.random ?? Math.random,
      signals: pageSignals(),
    };
  }

  /**
   * Subscribes to `channels` (one name or several). Over SSE each call opens its own stream; over
   * WebSocket every call shares the client's one socket, and channels can be added (another call) and
   * removed (`close`) while it runs.
   */
  subscribe<T = unknown>(channels: string | readonly string[], handlers: Handlers<T> = {}): Subscription {
    const names = [...new Set(typeof channels === 'string' ? [channels] : channels)];
    if (names.length === 0) throw new HeraldError('bad_request', 'subscribe needs at least one channel', { fatal: true });
    for (const name of names) {
      if (!isChannelName(name)) {
        throw new HeraldError('invalid_channel', `invalid channel name ${JSON.stringify(name)}`, {
          channel: String(name),
          fatal: true,
        });
      }
    }
    const any = handlers as Handlers;
    let subscription: Subscription;
    if (this.transport === 'sse') {
      const EventSourceClass = this.options.EventSource ?? globalThis.EventSource;
      if (!EventSourceClass) throw new HeraldError('bad_request', 'no EventSource here: pass options.EventSource');
      const settings = { ...this.linkSettings(), events: this.options.events ?? [], EventSource: EventSourceClass };
      const sse = new SseSubscription(settings, names, any, this.tokens);
      // Handlers are never called from inside `subscribe`: the connection starts right after it returns.
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

  private socket(): WsLink {
    if (!this.ws) {
      const WebSocketClass = this.options.WebSocket ?? globalThis.WebSocket;
      if (!WebSocketClass) throw new HeraldError('bad_request', 'no WebSocket here: pass options.WebSocket');
      const settings = {
        ...this.linkSettings(),
        WebSocket: WebSocketClass,
        pingIntervalMs: this.options.pingIntervalMs ?? DEFAULTS.pingIntervalMs,
        pongTimeoutMs: this.options.pongTimeoutMs ?? DEFAULTS.pongTimeoutMs,
      };
      const link: WsLink = new WsLink(settings, this.tokens, () => {
        if (this.ws === link) this.ws = null;
      });
      this.ws = link;
    }
    return this.ws;
  }

  /** Closes every subscription of this client. */
  close(): void {
    for (const subscription of [...this.open]) subscription.close();
  }
}

/** Makes a client; see `ClientOptions` for what it takes. */
export function createClient(options: ClientOptions = {}): HeraldClient {
  return new HeraldClient(options);
}
