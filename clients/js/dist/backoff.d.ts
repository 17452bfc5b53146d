export interface BackoffOptions {
    /** The first delay's upper bound, in milliseconds. */
    readonly minDelayMs: number;
    /** No delay is longer than this. */
    readonly maxDelayMs: number;
    /** Random numbers in [0, 1). */
    readonly random: () => number;
}
/**
 * The delay before attempt number `attempt` (1 for the first retry): a random value between half and
 * all of `minDelayMs * 2^(attempt-1)`, that ceiling capped at `maxDelayMs`, and never below `floorMs`.
 */
export declare function backoffDelay(attempt: number, options: BackoffOptions, floorMs?: number): number;
/** A random delay in [0, `jitterMs`): how long to wait before leaving a draining node. */
export declare function drainDelay(jitterMs: number, random: () => number): number;
/** Counts attempts since the last success. */
export declare class Backoff {
    private readonly options;
    private attempts;
    constructor(options: BackoffOptions);
    /** Attempts counted so far. */
    get attempt(): number;
    /** Counts one more failed attempt and returns the delay before the next one. */
    next(floorMs?: number): number;
    /** A connection succeeded: start again from the shortest delay. */
    reset(): void;
}
