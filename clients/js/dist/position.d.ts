import type { Message, Position, ResetReason } from './types.js';
/**
 * Orders two positions of one channel: negative when `a` comes first, 0 when equal, positive when `a`
 * comes later. Positions of different epochs have no order (an epoch change means a reset): null.
 */
export declare function comparePositions(a: Position, b: Position): number | null;
/** True when `position` is already covered by `held`: same epoch, at or below its offset. */
export declare function isCovered(position: Position, held: Position | null | undefined): boolean;
/** Checks that a value is a position as Herald sends them (an epoch name and a non-negative offset). */
export declare function isPosition(value: unknown): value is Position;
/** What to do with a publication that arrived. */
export type Verdict = {
    readonly kind: 'deliver';
} | {
    readonly kind: 'duplicate';
} | {
    readonly kind: 'stale';
}
/** Deliver, but first tell the application about a reset Herald did not send. */
 | {
    readonly kind: 'reset-then-deliver';
    readonly reason: ResetReason;
    readonly position: Position;
};
/**
 * The position each channel is at, as far as the application knows. `accept` decides about each
 * publication, `reset` records a reset, `confirm` a position Herald reports (WebSocket `subscribed`).
 */
export declare class PositionTracker {
    private readonly channels;
    /** The position last handed over or reset to, if any. */
    get(channel: string): Position | undefined;
    /** Forgets a channel (unsubscribed). */
    forget(channel: string): void;
    private record;
    private move;
    /**
     * Decides about a publication and, unless it is dropped, moves the channel to its position. The first
     * publication of a channel with no known position is delivered as it is.
     */
    accept(message: Pick<Message, 'channel' | 'epoch' | 'offset'>): Verdict;
    /** Records a reset: delivery continues right after `position`. */
    reset(channel: string, position: Position): void;
    /**
     * Records the position Herald says the client holds now (WebSocket `subscribed`). Returns the reason
     * of a reset the application must hear when it does not follow from what it was handed, else null.
     */
    confirm(channel: string, position: Position): ResetReason | null;
}
