import { Link, type LinkSettings } from './link.js';
import type { TokenSource } from './token.js';
import { type ConnectionState, type Handlers, type Position, type StateInfo, type Subscription } from './types.js';
export interface SseSettings extends LinkSettings {
    readonly events: readonly string[];
    readonly EventSource: typeof EventSource;
}
export declare class SseSubscription extends Link implements Subscription {
    private readonly sse;
    private readonly handlers;
    private readonly tokens;
    readonly channels: readonly string[];
    private readonly tracker;
    private readonly announced;
    private source;
    private cursor;
    /** Errors since the stream was last connected. */
    private errors;
    /** Whether the current EventSource ever got `herald.connected`. */
    private connectedOnce;
    /** Bumped whenever an attempt is abandoned, so its late callbacks are ignored. */
    private generation;
    constructor(sse: SseSettings, channels: readonly string[], handlers: Handlers, tokens: TokenSource);
    position(channel: string): Position | undefined;
    close(): void;
    protected emit(state: ConnectionState, info: StateInfo): void;
    protected open(url: string): void;
    protected shut(): void;
    private connect;
    private remember;
    private onConnected;
    private onReset;
    private onPublication;
    /**
     * EventSource reports an error: with `readyState` CONNECTING it is reconnecting by itself (the stream
     * ended or the attempt failed), with CLOSED it gave up (an HTTP error or a wrong content type).
     */
    private onStreamError;
    /**
     * Asks the same URL with `fetch` what EventSource could not tell: the status and the JSON error (a
     * stream that opens this time is closed at once: the failure passed).
     */
    private diagnose;
    /** What to do about a refused stream. */
    private refusal;
}
