import { Backoff } from './backoff.js';
import type { ConnectionState, HeraldError, StateInfo, Transport } from './types.js';
/** The page signals a connection follows (absent outside browsers: always online and visible). */
export interface PageSignals {
    online(): boolean;
    visible(): boolean;
    /** Calls `listener` on each change; returns how to stop. */
    watch(listener: (change: 'online' | 'offline' | 'visible' | 'hidden') => void): () => void;
}
/** The browser's `online`/`offline` events and the document's visibility. */
export declare function pageSignals(): PageSignals;
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
export declare abstract class Link {
    protected readonly settings: LinkSettings;
    private current;
    private started;
    private stopped;
    private urlIndex;
    private timer;
    private hiddenTimer;
    private unwatch;
    private everOpened;
    protected readonly backoff: Backoff;
    protected info: {
        node?: string;
        connectionId?: string;
    };
    constructor(settings: LinkSettings);
    get state(): ConnectionState;
    /** The base URL in use. */
    protected get url(): string;
    /** Opens the transport to `url`; reports back through `opened`, `lost` or `fail`. */
    protected abstract open(url: string): void;
    /** Shuts the transport without reporting anything (the link decides what follows). */
    protected abstract shut(): void;
    /** Tells the application about a state change. */
    protected abstract emit(state: ConnectionState, info: StateInfo): void;
    /** The page became visible again (check what timers may have missed). */
    protected onVisible(): void;
    protected get isStopped(): boolean;
    start(): void;
    stop(): void;
    private clearTimers;
    private attempt;
    /** The transport is open (call again with new details, for example SSE `herald.connected`). */
    protected opened(details?: {
        node?: string;
        connectionId?: string;
    }): void;
    /** The transport went down or was refused: shut it and try again as `retry` says. */
    protected lost(retry?: Retry): void;
    /** The transport is re-establishing itself (EventSource's own reconnect): say so, schedule nothing. */
    protected reconnectingByItself(): void;
    /** Refused for good: stop, say why. */
    protected fail(error: HeraldError): void;
    /** Reconnect now (a pending retry is brought forward). */
    protected reconnectNow(): void;
    private setState;
    private onPageChange;
}
