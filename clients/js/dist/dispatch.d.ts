import type { Message, Position } from './types.js';
export declare function report(error: unknown): void;
/** Calls `fn` (if there is one) and reports what it throws. */
export declare function call<A extends unknown[]>(fn: ((...args: A) => void) | undefined, ...args: A): void;
/** Parses a JSON text, or returns undefined. */
export declare function parseJson(text: unknown): unknown;
/** Checks the fields the client relies on in an envelope. */
export declare function isEnvelope(value: unknown): value is Message;
/** A reset as Herald sends it (SSE `herald.reset` data, WebSocket `reset`). */
export interface ResetNotice extends Position {
    readonly channel: string;
    readonly reason: string;
}
export declare function isResetNotice(value: unknown): value is ResetNotice;
/** The position part of a value (a fresh object, so the caller's cannot change it). */
export declare function positionOf(value: Position): Position;
