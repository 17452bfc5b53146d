// Reconnect delays: exponential, capped, with jitter so that clients dropped together do not come back
// together. A server hint (Retry-After, a drain) sets a floor or replaces the exponential step.

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
export function backoffDelay(attempt: number, options: BackoffOptions, floorMs = 0): number {
  const steps = Math.max(0, Math.min(attempt - 1, 30));
  const ceiling = Math.min(options.maxDelayMs, options.minDelayMs * 2 ** steps);
  const delay = ceiling / 2 + (ceiling / 2) * clampUnit(options.random());
  return Math.round(Math.max(delay, Math.min(floorMs, options.maxDelayMs)));
}

/** A random delay in [0, `jitterMs`): how long to wait before leaving a draining node. */
export function drainDelay(jitterMs: number, random: () => number): number {
  return Math.round(Math.max(0, jitterMs) * clampUnit(random()));
}

function clampUnit(value: number): number {
  return Number.isFinite(value) ? Math.min(Math.max(value, 0), 1) : 0.5;
}

/** Counts attempts since the last success. */
export class Backoff {
  private attempts = 0;

  constructor(private readonly options: BackoffOptions) {}

  /** Attempts counted so far. */
  get attempt(): number {
    return this.attempts;
  }

  /** Counts one more failed attempt and returns the delay before the next one. */
  next(floorMs = 0): number {
    this.attempts += 1;
    return backoffDelay(this.attempts, this.options, floorMs);
  }

  /** A connection succeeded: start again from the shortest delay. */
  reset(): void {
    this.attempts = 0;
  }
}
