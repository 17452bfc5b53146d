// One `subscribe` over Server-Sent Events: an EventSource on `/v1/sse` for a fixed set of channels.
//
// EventSource reconnects by itself after a dropped stream, after the server's `retry:` delay (the drain
// hint included), sending `Last-Event-ID`; the client lets it, once. When that native attempt fails
// too, when the server refuses the stream (EventSource then closes for good), or when the token is due,
// the client takes over: a fresh token, the next base URL, its own backoff, and the last cursor as
// `?last_event_id=` (a new EventSource cannot set the header).

import { call, isEnvelope, isResetNotice, parseJson, positionOf } from './dispatch.js';
import { Link, type LinkSettings, type Retry } from './link.js';
import { PositionTracker } from './position.js';
import type { TokenSource } from './token.js';
import {
  type ConnectionState,
  HeraldError,
  type Handlers,
  type Position,
  type StateInfo,
  type Subscription,
} from './types.js';
import { sseUrl } from './urls.js';

/** Event names Herald uses for itself. */
const CONNECTED = 'herald.connected';
const RESET = 'herald.reset';

/** Error codes after which retrying cannot help. */
const FATAL_CODES = new Set(['invalid_channel', 'bad_request', 'forbidden', 'not_found', 'method_not_allowed']);

export interface SseSettings extends LinkSettings {
  readonly events: readonly string[];
  readonly EventSource: typeof EventSource;
}

export class SseSubscription extends Link implements Subscription {
  readonly channels: readonly string[];
  private readonly tracker = new PositionTracker();
  private readonly announced = new Set<string>();
  private source: EventSource | null = null;
  private cursor: string | null = null;
  /** Errors since the stream was last connected. */
  private errors = 0;
  /** Whether the current EventSource ever got `herald.connected`. */
  private connectedOnce = false;
  /** Bumped whenever an attempt is abandoned, so its late callbacks are ignored. */
  private generation = 0;

  constructor(
    private readonly sse: SseSettings,
    channels: readonly string[],
    private readonly handlers: Handlers,
    private readonly tokens: TokenSource,
  ) {
    super(sse);
    this.channels = channels;
  }

  position(channel: string): Position | undefined {
    const held = this.tracker.get(channel);
    return held ? positionOf(held) : undefined;
  }

  close(): void {
    this.stop();
  }

  protected emit(state: ConnectionState, info: StateInfo): void {
    call(this.handlers.onState, state, info);
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
        call(this.handlers.onError, failure);
        this.lost({ error: failure });
      },
    );
  }

  protected shut(): void {
    this.generation++;
    const source = this.source;
    this.source = null;
    if (source) source.close();
  }

  private connect(url: string, token: string | null, generation: number): void {
    const href = sseUrl(url, this.channels, { token, lastEventId: this.cursor });
    let source: EventSource;
    try {
      source = new this.sse.EventSource(href);
    } catch (error) {
      this.fail(new HeraldError('bad_request', `cannot open ${href}: ${String(error)}`, { fatal: true }));
      return;
    }
    this.source = source;
    this.errors = 0;
    this.connectedOnce = false;
    const live = () => generation === this.generation && this.source === source;
    source.addEventListener(CONNECTED, (event) => {
      if (live()) this.onConnected(event as MessageEvent);
    });
    source.addEventListener(RESET, (event) => {
      if (live()) this.onReset(event as MessageEvent);
    });
    const onPublication = (event: Event) => {
      if (live()) this.onPublication(event as MessageEvent);
    };
    for (const name of new Set(['message', ...this.sse.events])) {
      if (name !== CONNECTED && name !== RESET) source.addEventListener(name, onPublication);
    }
    source.onerror = () => {
      if (live()) this.onStreamError(source, url, token);
    };
  }

  private remember(event: MessageEvent): void {
    if (event.lastEventId) this.cursor = event.lastEventId;
  }

  private onConnected(event: MessageEvent): void {
    this.remember(event);
    this.errors = 0;
    this.connectedOnce = true;
    const data = parseJson(event.data) as { node?: unknown; connection_id?: unknown } | undefined;
    this.opened({
      node: typeof data?.node === 'string' ? data.node : undefined,
      connectionId: typeof data?.connection_id === 'string' ? data.connection_id : undefined,
    });
    for (const channel of this.channels) {
      if (this.announced.has(channel)) continue;
      this.announced.add(channel);
      const held = this.tracker.get(channel);
      call(this.handlers.onSubscribed, channel, held ? positionOf(held) : null);
    }
  }

  private onReset(event: MessageEvent): void {
    this.remember(event);
    const notice = parseJson(event.data);
    if (!isResetNotice(notice)) {
      call(this.handlers.onError, new HeraldError('malformed_event', `unreadable ${RESET}: ${String(event.data)}`));
      return;
    }
    const position = positionOf(notice);
    this.tracker.reset(notice.channel, position);
    call(this.handlers.onReset, notice.channel, position, notice.reason);
  }

  private onPublication(event: MessageEvent): void {
    this.remember(event);
    const message = parseJson(event.data);
    if (!isEnvelope(message)) {
      call(this.handlers.onError, new HeraldError('malformed_event', `unreadable ${event.type}: ${String(event.data)}`));
      return;
    }
    const verdict = this.tracker.accept(message);
    if (verdict.kind === 'duplicate' || verdict.kind === 'stale') return;
    if (verdict.kind === 'reset-then-deliver') {
      call(this.handlers.onReset, message.channel, positionOf(verdict.position), verdict.reason);
    }
    call(this.handlers.onMessage, message);
  }

  /**
   * EventSource reports an error: with `readyState` CONNECTING it is reconnecting by itself (the stream
   * ended or the attempt failed), with CLOSED it gave up (an HTTP error or a wrong content type).
   */
  private onStreamError(source: EventSource, url: string, token: string | null): void {
    this.errors += 1;
    if (source.readyState === this.sse.EventSource.CLOSED) {
      this.source = null;
      void this.diagnose(url, this.generation);
      return;
    }
    if (this.tokens.enabled && (this.tokens.current !== token || this.tokens.due() || this.tokens.expired(1000))) {
      // The stream most likely ended with `: closed token_expired`, or a newer token is at hand: the
      // URL EventSource would retry holds the old one.
      this.lost({ immediate: true });
      return;
    }
    if (this.errors >= 2 || !this.connectedOnce) {
      // EventSource's own attempt failed, or this URL never worked: the node may be gone. Take over,
      // with backoff and the next URL (EventSource would keep trying the same one).
      this.lost({ nextUrl: true, error: new HeraldError('network', 'the stream could not be re-established') });
      return;
    }
    // EventSource retries by itself after the server's `retry:` delay (a drain's jitter included).
    this.reconnectingByItself();
  }

  /**
   * Asks the same URL with `fetch` what EventSource could not tell: the status and the JSON error (a
   * stream that opens this time is closed at once: the failure passed).
   */
  private async diagnose(url: string, generation: number): Promise<void> {
    const href = sseUrl(url, this.channels, { token: this.tokens.current, lastEventId: this.cursor });
    let retry: Retry;
    const abort = new AbortController();
    try {
      const response = await fetch(href, { headers: { accept: 'text/event-stream' }, signal: abort.signal });
      if (response.ok) {
        abort.abort();
        retry = { error: new HeraldError('network', 'the stream failed; it opens again') };
      } else {
        retry = await this.refusal(response);
      }
    } catch (error) {
      retry = { nextUrl: true, error: new HeraldError('network', `cannot reach ${url}: ${String(error)}`) };
    }
    if (generation !== this.generation || this.isStopped) return;
    if (retry.error?.fatal) {
      call(this.handlers.onError, retry.error);
      this.fail(retry.error);
      return;
    }
    if (retry.error && retry.error.code !== 'network') call(this.handlers.onError, retry.error);
    this.lost(retry);
  }

  /** What to do about a refused stream. */
  private async refusal(response: Response): Promise<Retry> {
    const body = (await response.json().catch(() => undefined)) as { error?: { code?: unknown; message?: unknown } };
    const code = typeof body?.error?.code === 'string' ? body.error.code : `http_${response.status}`;
    const text = typeof body?.error?.message === 'string' ? body.error.message : response.statusText;
    const retryAfter = Number(response.headers.get('retry-after'));
    const floorMs = Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : 0;
    const several = this.sse.urls.length > 1;
    const status = response.status;
    if (code === 'invalid_cursor') {
      // Only a cursor Herald gave is ever sent; a refused one (another server version?) cannot be
      // repaired: start over at the top and tell the application every channel must be reloaded.
      this.cursor = null;
      for (const channel of this.channels) {
        this.tracker.forget(channel);
        call(this.handlers.onReset, channel, null, 'cursor_refused');
      }
      return { immediate: true, error: new HeraldError(code, text, { status }) };
    }
    if (code === 'unauthenticated' || status === 401) {
      if (!this.tokens.enabled) return { error: new HeraldError(code, text, { status, fatal: true }) };
      const expired = this.tokens.expired();
      this.tokens.invalidate();
      return { immediate: expired, error: new HeraldError(code, text, { status }) };
    }
    if (FATAL_CODES.has(code)) return { error: new HeraldError(code, text, { status, fatal: true }) };
    // 429, 503 (engine unavailable, draining), 5xx, a proxy's 502: another node may take it; the same
    // node only after the delay it asked for.
    return { nextUrl: several, floorMs: several ? 0 : floorMs, error: new HeraldError(code, text, { status }) };
  }
}
