// The shapes the client hands to an application, and the options it takes. Field names of what comes
// from Herald (envelopes, resets) are kept as docs/protocol.md spells them.

/** Where a publication sits in its channel: an epoch name and an offset within it (1, 2, 3, … ). */
export interface Position {
  readonly epoch: string;
  readonly offset: number;
}

/** One publication, as Herald sends it (the envelope of docs/protocol.md). */
export interface Message<T = unknown> {
  readonly channel: string;
  readonly epoch: string;
  readonly offset: number;
  /** The publisher's event name, `message` when it gave none. */
  readonly event: string;
  readonly data: T;
  readonly correlation_id: string;
  /** RFC 3339 in UTC, when the engine accepted it. */
  readonly published_at: string;
}

/**
 * Why a channel was reset. The first four come from Herald; the client adds its own when it finds
 * something Herald should have announced (`gap`, `epoch_changed`) or when it had to start a channel over
 * (`cursor_refused`: Herald refused an SSE cursor, so the stream restarted at the top).
 */
export type ResetReason =
  | 'history_gone'
  | 'gap'
  | 'epoch_changed'
  | 'engine_rollback'
  | 'cursor_refused'
  | (string & {});

/** The transport a subscription uses. */
export type Transport = 'sse' | 'ws';

/**
 * The state of a subscription's connection:
 * - `connecting`: the first attempt is under way;
 * - `open`: connected, publications flow;
 * - `reconnecting`: the connection was lost or refused; the client is waiting or trying again;
 * - `offline`: the browser says it is offline; the client waits for it to come back;
 * - `paused`: the page has been hidden for longer than `pauseWhenHiddenMs`; it resumes when shown;
 * - `closed`: closed by the application, or refused for good (see the error).
 */
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'offline' | 'paused' | 'closed';

/** What goes with a state change. */
export interface StateInfo {
  readonly transport: Transport;
  /** The base URL in use (or about to be tried). */
  readonly url: string;
  /** Herald's node name, once `open` (SSE `herald.connected`; unknown over WebSocket). */
  readonly node?: string;
  /** Herald's connection ID, once `open` over SSE. */
  readonly connectionId?: string;
  /** Attempts made since the connection was last open. */
  readonly attempt: number;
  /** When `reconnecting`: how long until the next attempt, in milliseconds. */
  readonly retryInMs?: number;
  /** Why the connection went down or was refused, when known. */
  readonly error?: HeraldError;
}

/**
 * An error Herald answered (its `code` and `message`, as in docs/protocol.md "Errors"), or one the client
 * met (codes `network`, `token_error`, `permission_revoked`, `pong_timeout`, `closed_<ws code>`).
 */
export class HeraldError extends Error {
  /** Herald's error code, or one of the client's own listed above. */
  readonly code: string;
  /** The HTTP status, for a refused SSE request. */
  readonly status?: number;
  /** The channel it concerns, for a refused subscription. */
  readonly channel?: string;
  /** True when the client gave up (the channel or the whole subscription); false when it retries. */
  readonly fatal: boolean;

  constructor(code: string, message: string, extra: { status?: number; channel?: string; fatal?: boolean } = {}) {
    super(message);
    this.name = 'HeraldError';
    this.code = code;
    this.status = extra.status;
    this.channel = extra.channel;
    this.fatal = extra.fatal ?? false;
  }
}

/** What an application passes to `subscribe`. Every handler is optional. */
export interface Handlers<T = unknown> {
  /** A publication, in offset order per channel, never the same position twice. */
  onMessage?(message: Message<T>): void;
  /**
   * Publications of `channel` may have been missed: reload its state from the source of truth. Delivery
   * continues right after `position` (null when the client cannot know it: `cursor_refused`).
   */
  onReset?(channel: string, position: Position | null, reason: ResetReason): void;
  /** The connection's state changed. */
  onState?(state: ConnectionState, info: StateInfo): void;
  /**
   * The channel is live: everything published from now on will arrive. Called once per subscription and
   * channel. Over WebSocket `position` is where delivery starts; over SSE Herald does not say (null).
   */
  onSubscribed?(channel: string, position: Position | null): void;
  /** Something was refused or failed; `error.fatal` says whether the client gave up on it. */
  onError?(error: HeraldError): void;
}

/** Gives the client a token: a JWT string, or null/undefined to connect without one. */
export type TokenProvider = () => string | null | undefined | Promise<string | null | undefined>;

/** Options of `createClient`. */
export interface ClientOptions {
  /**
   * Herald's base URL, or several (nodes, or regions) tried in turn when a connection fails. A relative
   * URL (`''`, `/`, `/herald`) is resolved against the page. Default: the page's origin.
   */
  url?: string | readonly string[];
  /** `sse` (EventSource; one connection per `subscribe`) or `ws` (one socket for all). Default `sse`. */
  transport?: Transport;
  /** Called for the first token and whenever a fresh one is needed. Without it the client is anonymous. */
  getToken?: TokenProvider;
  /**
   * Fetch a fresh token this long before the current one expires (its `exp`), at most half its lifetime:
   * WebSocket sends `refresh`, SSE uses it at its next reconnect. Default 30000.
   */
  refreshBeforeMs?: number;
  /** SSE only: event names to listen for besides `message` (EventSource only hears names it is told). */
  events?: readonly string[];
  /** First reconnect delay (before jitter), in milliseconds. Default 500. */
  minDelayMs?: number;
  /** Longest reconnect delay, in milliseconds. Default 15000. */
  maxDelayMs?: number;
  /** Longest random delay before reconnecting to a draining node's replacement. Default 500. */
  drainJitterMs?: number;
  /** WebSocket only: send a `ping` after this long without any frame (0: never). Default 20000. */
  pingIntervalMs?: number;
  /** WebSocket only: how long to wait for `pong` before the socket is taken for dead. Default 10000. */
  pongTimeoutMs?: number;
  /** Close the connection after the page was hidden this long, and resume when it is shown. Default: never. */
  pauseWhenHiddenMs?: number | null;
  /** EventSource constructor (outside browsers). Default: the global one. */
  EventSource?: typeof EventSource;
  /** WebSocket constructor (outside browsers). Default: the global one. */
  WebSocket?: typeof WebSocket;
  /** Random numbers in [0, 1) for jitter (tests). Default Math.random. */
  random?: () => number;
}

/** One `subscribe` call: its channels, positions held, and how to stop it. */
export interface Subscription {
  readonly channels: readonly string[];
  /** The transport's state. */
  readonly state: ConnectionState;
  /** The last position handed to the application (or set by a reset), per channel. */
  position(channel: string): Position | undefined;
  /** Stops this subscription (over WebSocket, unsubscribes its channels no other subscription holds). */
  close(): void;
}
