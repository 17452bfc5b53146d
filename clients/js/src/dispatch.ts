// Handing things to the application: a handler that throws must not break the client's bookkeeping,
// so its error is reported to the page (as an uncaught error would be) and the client goes on.

import { isPosition } from './position.js';
import type { Message, Position } from './types.js';

export function report(error: unknown): void {
  const global = globalThis as { reportError?: (e: unknown) => void };
  if (typeof global.reportError === 'function') global.reportError(error);
  else
    setTimeout(() => {
      throw error;
    }, 0);
}

/** Calls `fn` (if there is one) and reports what it throws. */
export function call<A extends unknown[]>(fn: ((...args: A) => void) | undefined, ...args: A): void {
  if (!fn) return;
  try {
    fn(...args);
  } catch (error) {
    report(error);
  }
}

/** Parses a JSON text, or returns undefined. */
export function parseJson(text: unknown): unknown {
  if (typeof text !== 'string') return undefined;
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Checks the fields the client relies on in an envelope. */
export function isEnvelope(value: unknown): value is Message {
  if (!value || typeof value !== 'object') return false;
  const v = value as { channel?: unknown };
  return typeof v.channel === 'string' && isPosition(value);
}

/** A reset as Herald sends it (SSE `herald.reset` data, WebSocket `reset`). */
export interface ResetNotice extends Position {
  readonly channel: string;
  readonly reason: string;
}

export function isResetNotice(value: unknown): value is ResetNotice {
  if (!isEnvelope(value)) return false;
  return typeof (value as { reason?: unknown }).reason === 'string';
}

/** The position part of a value (a fresh object, so the caller's cannot change it). */
export function positionOf(value: Position): Position {
  return { epoch: value.epoch, offset: value.offset };
}
