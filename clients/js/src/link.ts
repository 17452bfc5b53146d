// What both transports share: the list of base URLs, the reconnect schedule, the connection state
// reported to the application, and the page's online/offline and visibility signals.

import { Backoff, drainDelay } from './backoff.js';
import type { ConnectionState, HeraldError, StateInfo, Transport } from './types.js';

/** The page signals a connection follows (absent outside browsers: always online and visible). */
export interface PageSignals {
  online(): boolean;
  visible(): boolean;
  /** Calls `listener` on each change; returns how to stop. */
  watch(listener: (change: 'online' | 'offline' | 'visible' | 'hidden') => void): () => void;
}

/** The browser's `online`/`offline` events and the document's visibility. */
export function pageSignals(): PageSignals {
  const win = typeof window !== 'undefined' && typeof window.addEventListener === 'function' ? window : undefined;
  const doc = typeof document !== 'undefined' && typeof document.addEventListener === 'function' ? document : undefined;
  return {
    online: () => typeof navigator === 'undefined' || navigator.onLine !== false,
    visible: () => !doc || doc.visibilityState !== 'hidden',
    watch(listener) {
      const online = () => listener('online');
      const offline = () => listener('offline');
      const visibility = () => listener(doc && doc.visibilityState === 'hidden' ? 'hidden' : 'visible');
      win?.addEventListener('online', online);
      win?.addEventListener('offline', offline);
      doc?.addEventListener('visibilitychange', visibility);
      return () => {
        win?.removeEventListener('online', online);
        win?.removeEventListener('offline', offline);
        doc?.removeEventListener('visibilitychange', visibility);
      };
    },
  };
}

/** Settings a link needs from the client options. */
export interface LinkSettings {
  readonly transport: Transport;
  readonly urls: readonly string[];
  readonly minDelayMs: number;
  readonly maxDelayMs: number;
  readonly drainJitterMs: number;
  readonly pauseWhenHiddenMs: number | null;
  readonly random: () => number;
  readonly signals: PageSignals;
}

/** How to come back after a loss. */
export interface Retry {
  /** Why (reported with the state). */
  readonly error?: HeraldError;
  /** Try the next base URL (the node may be gone or draining). */
  readonly nextUrl?: boolean;
  /** The server asked for this delay at least (Retry-After), in milliseconds. */
  readonly floorMs?: number;
  /** A drain: wait only a short random delay, not the exponential step. */
  readonly drain?: boolean;
  /** Reconnect at once (a known cause that a new attempt fixes, such as an expired token). */
  readonly immediate?: boolean;
}

/**
 * One logical connection that stays up until `stop`: subclasses open and shut the actual transport and
 * report what happens; this class decides when to try again and tells the application.
 */
export abstract class Link {
  private current: ConnectionState = 'closed';
  private started = false;
  private stopped = false;
  private urlIndex = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private hiddenTimer: ReturnType<typeof setTimeout> | null = null;
  private unwatch: (() => void) | null = null;
  private everOpened = false;
  protected readonly backoff: Backoff;
  protected info: { node?: string; connectionId?: string } = {};

  constructor(protected readonly settings: LinkSettings) {
    this.backoff = new Backoff(settings);
  }

  get state(): ConnectionState {
    return this.current;
  }

  /** The base URL in use. */
  protected get url(): string {
    return this.settings.urls[this.urlIndex % this.settings.urls.length];
  }

  /** Opens the transport to `url`; reports back through `opened`, `lost` or `fail`. */
  protected abstract open(url: string): void;
  /** Shuts the transport without reporting anything (the link decides what follows). */
  protected abstract shut(): void;
  /** Tells the application about a state change. */
  protected abstract emit(state: ConnectionState, info: StateInfo): void;
  /** The page became visible again (check what timers may have missed). */
  protected onVisible(): void {}

  protected get isStopped(): boolean {
    return this.stopped;
  }

  start(): void {
    if (this.started || this.stopped) return;
    this.started = true;
    this.unwatch = this.settings.signals.watch((change) => this.onPageChange(change));
    if (!this.settings.signals.online()) {
      this.setState('offline');
      return;
    }
    this.attempt('connecting');
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.clearTimers();
    this.unwatch?.();
    this.unwatch = null;
    this.shut();
    this.setState('closed');
  }

  private clearTimers(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.hiddenTimer !== null) clearTimeout(this.hiddenTimer);
    this.timer = null;
    this.hiddenTimer = null;
  }

  private attempt(state: 'connecting' | 'reconnecting'): void {
    if (this.stopped) return;
    this.timer = null;
    this.info = {};
    if (this.current !== state) this.setState(state);
    this.open(this.url);
  }

  /** The transport is open (call again with new details, for example SSE `herald.connected`). */
  protected opened(details: { node?: string; connectionId?: string } = {}): void {
    if (this.stopped) return;
    this.backoff.reset();
    this.everOpened = true;
    this.info = { ...this.info, ...details };
    this.setState('open');
  }

  /** The transport went down or was refused: shut it and try again as `retry` says. */
  protected lost(retry: Retry = {}): void {
    if (this.stopped) return;
    this.shut();
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.current === 'offline' || this.current === 'paused') return;
    if (!this.settings.signals.online()) {
      // The connection fell with the network: wait for the browser's `online` instead of retrying.
      this.setState('offline');
      return;
    }
    if (retry.nextUrl) this.urlIndex = (this.urlIndex + 1) % this.settings.urls.length;
    let delay: number;
    if (retry.immediate) delay = 0;
    else if (retry.drain) delay = drainDelay(this.settings.drainJitterMs, this.settings.random);
    else delay = this.backoff.next(retry.floorMs ?? 0);
    this.setState('reconnecting', { retryInMs: delay, error: retry.error });
    this.timer = setTimeout(() => this.attempt('reconnecting'), delay);
  }

  /** The transport is re-establishing itself (EventSource's own reconnect): say so, schedule nothing. */
  protected reconnectingByItself(): void {
    if (this.stopped || this.current === 'reconnecting') return;
    this.setState('reconnecting');
  }

  /** Refused for good: stop, say why. */
  protected fail(error: HeraldError): void {
    if (this.stopped) return;
    this.stopped = true;
    this.clearTimers();
    this.unwatch?.();
    this.unwatch = null;
    this.shut();
    this.setState('closed', { error });
  }

  /** Reconnect now (a pending retry is brought forward). */
  protected reconnectNow(): void {
    if (this.stopped || this.current === 'offline' || this.current === 'paused') return;
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.attempt('reconnecting');
    }
  }

  private setState(state: ConnectionState, extra: { retryInMs?: number; error?: HeraldError } = {}): void {
    this.current = state;
    const info: StateInfo = {
      transport: this.settings.transport,
      url: this.url,
      attempt: this.backoff.attempt,
      ...(state === 'open' ? this.info : {}),
      ...extra,
    };
    this.emit(state, info);
  }

  private onPageChange(change: 'online' | 'offline' | 'visible' | 'hidden'): void {
    if (this.stopped) return;
    switch (change) {
      case 'offline':
        if (this.timer !== null) clearTimeout(this.timer);
        this.timer = null;
        this.shut();
        this.setState('offline');
        break;
      case 'online':
        if (this.current === 'offline') {
          this.backoff.reset();
          this.attempt(this.everOpened ? 'reconnecting' : 'connecting');
        }
        break;
      case 'hidden': {
        const after = this.settings.pauseWhenHiddenMs;
        if (after === null || after === undefined || this.hiddenTimer !== null) break;
        this.hiddenTimer = setTimeout(() => {
          this.hiddenTimer = null;
          if (this.stopped || this.current === 'offline') return;
          if (this.timer !== null) clearTimeout(this.timer);
          this.timer = null;
          this.shut();
          this.setState('paused');
        }, after);
        break;
      }
      case 'visible':
        if (this.hiddenTimer !== null) clearTimeout(this.hiddenTimer);
        this.hiddenTimer = null;
        if (this.current === 'paused') {
          if (!this.settings.signals.online()) {
            this.setState('offline');
            break;
          }
          this.backoff.reset();
          this.attempt(this.everOpened ? 'reconnecting' : 'connecting');
        } else if (this.timer !== null) {
          // Background tabs run timers late: do not make the user wait out a long delay.
          this.reconnectNow();
        } else {
          this.onVisible();
        }
        break;
    }
  }
}
