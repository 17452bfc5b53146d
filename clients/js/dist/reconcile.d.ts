import { type Handlers, HeraldError, type Message, type Position, type ResetReason } from './types.js';
/** What the application's fetch returns: the state, and the position it reflects if it knows one. */
export interface Snapshot<S> {
    readonly state: S;
    /**
     * The channel position the state includes (for example the publish answer's `epoch`/`offset` the
     * backend stored with it). Publications at or below it, in its epoch, are then not handed over.
     * Without it every publication held back is handed over: apply them idempotently.
     */
    readonly position?: Position | null;
}
/** Why a load runs. */
export type LoadCause = 'subscribed' | 'reset' | 'retry';
export interface ReconcileOptions<T, S> {
    /**
     * Loads the channel's state from the source of truth. Runs once the channel is live (so nothing
     * published afterwards can be missed) and after each reset. `signal` aborts when a newer load
     * supersedes this one or the subscription closes.
     */
    fetch(channel: string, signal: AbortSignal, cause: LoadCause): Promise<Snapshot<S>>;
    /** Replace the channel's state with the loaded one; live publications follow through `onMessage`. */
    onSnapshot(channel: string, state: S, position: Position | null): void;
    /** A live publication the snapshot does not include, in order. */
    onMessage?(message: Message<T>): void;
    /** Told before the reload starts. */
    onReset?(channel: string, position: Position | null, reason: ResetReason): void;
    onState?: Handlers<T>['onState'];
    onSubscribed?: Handlers<T>['onSubscribed'];
    /**
     * Errors of the subscription, failed loads (code `fetch_failed`, retried with backoff), and states
     * that came back behind the stream (code `snapshot_behind`: loaded again with backoff, up to three
     * times in a row, then taken as they are).
     */
    onError?(error: HeraldError): void;
    /** Publications held back per channel before the load in flight is abandoned for a later one. Default 10000. */
    maxBuffered?: number;
    /** First delay before a failed load is retried, in milliseconds (doubling up to 30 s). Default 1000. */
    retryDelayMs?: number;
}
/** Handlers to pass to `subscribe`, plus what the reconcile helper knows. */
export interface ReconcileHandlers<T> extends Handlers<T> {
    /** True while the channel's state is being loaded (its publications are held back). */
    loading(channel: string): boolean;
    /** Stops every load in flight (also done when the subscription closes). */
    dispose(): void;
}
/**
 * Wraps the application's handlers with the reconcile pattern:
 *
 * ```ts
 * client.subscribe(['order:8f3a'], reconcile({
 *   fetch: async (channel, signal) => {
 *     const order = await (await fetch('/api/orders/8f3a', { signal })).json();
 *     return { state: order, position: order.herald_position };
 *   },
 *   onSnapshot: (channel, order) => render(order),
 *   onMessage: (message) => render(applyUpdate(message.data)),
 * }));
 * ```
 */
export declare function reconcile<T = unknown, S = unknown>(options: ReconcileOptions<T, S>): ReconcileHandlers<T>;
