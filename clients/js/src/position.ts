// Positions and the per-channel bookkeeping that keeps the application's view exact: each position
// handed over at most once, in order, and a reset whenever the stream does not follow on.

import type { Message, Position, ResetReason } from './types.js';

/**
 * Orders two positions of one channel: negative when `a` comes first, 0 when equal, positive when `a`
 * comes later. Positions of different epochs have no order (an epoch change means a reset): null.
 */
export function comparePositions(a: Position, b: Position): number | null {
  if (a.epoch !== b.epoch) return null;
  return a.offset === b.offset ? 0 : a.offset < b.offset ? -1 : 1;
}

/** True when `position` is already covered by `held`: same epoch, at or below its offset. */
export function isCovered(position: Position, held: Position | null | undefined): boolean {
  if (!held) return false;
  const order = comparePositions(position, held);
  return order !== null && order <= 0;
}

/** Checks that a value is a position as Herald sends them (an epoch name and a non-negative offset). */
export function isPosition(value: unknown): value is Position {
  if (!value || typeof value !== 'object') return false;
  const { epoch, offset } = value as { epoch?: unknown; offset?: unknown };
  return typeof epoch === 'string' && epoch.length > 0 && Number.isSafeInteger(offset) && (offset as number) >= 0;
}

/** What to do with a publication that arrived. */
export type Verdict =
  | { readonly kind: 'deliver' }
  | { readonly kind: 'duplicate' }
  | { readonly kind: 'stale' }
  /** Deliver, but first tell the application about a reset Herald did not send. */
  | { readonly kind: 'reset-then-deliver'; readonly reason: ResetReason; readonly position: Position };

/** How many epochs a channel remembers having left (their late publications are dropped). */
const RETIRED_EPOCHS = 8;

interface ChannelRecord {
  held?: Position;
  retired: string[];
}

/**
 * The position each channel is at, as far as the application knows. `accept` decides about each
 * publication, `reset` records a reset, `confirm` a position Herald reports (WebSocket `subscribed`).
 */
export class PositionTracker {
  private readonly channels = new Map<string, ChannelRecord>();

  /** The position last handed over or reset to, if any. */
  get(channel: string): Position | undefined {
    return this.channels.get(channel)?.held;
  }

  /** Forgets a channel (unsubscribed). */
  forget(channel: string): void {
    this.channels.delete(channel);
  }

  private record(channel: string): ChannelRecord {
    let record = this.channels.get(channel);
    if (!record) {
      record = { retired: [] };
      this.channels.set(channel, record);
    }
    return record;
  }

  private move(record: ChannelRecord, to: Position): void {
    const from = record.held;
    if (from && from.epoch !== to.epoch) {
      record.retired = [from.epoch, ...record.retired.filter((e) => e !== from.epoch && e !== to.epoch)].slice(
        0,
        RETIRED_EPOCHS,
      );
    }
    record.held = { epoch: to.epoch, offset: to.offset };
  }

  /**
   * Decides about a publication and, unless it is dropped, moves the channel to its position. The first
   * publication of a channel with no known position is delivered as it is.
   */
  accept(message: Pick<Message, 'channel' | 'epoch' | 'offset'>): Verdict {
    const record = this.record(message.channel);
    const position = { epoch: message.epoch, offset: message.offset };
    const held = record.held;
    if (!held) {
      this.move(record, position);
      return { kind: 'deliver' };
    }
    if (held.epoch === position.epoch) {
      if (position.offset <= held.offset) return { kind: 'duplicate' };
      this.move(record, position);
      if (position.offset === held.offset + 1) return { kind: 'deliver' };
      return { kind: 'reset-then-deliver', reason: 'gap', position: { epoch: held.epoch, offset: position.offset - 1 } };
    }
    if (record.retired.includes(position.epoch)) return { kind: 'stale' };
    this.move(record, position);
    return {
      kind: 'reset-then-deliver',
      reason: 'epoch_changed',
      position: { epoch: position.epoch, offset: position.offset - 1 },
    };
  }

  /** Records a reset: delivery continues right after `position`. */
  reset(channel: string, position: Position): void {
    this.move(this.record(channel), position);
  }

  /**
   * Records the position Herald says the client holds now (WebSocket `subscribed`). Returns the reason
   * of a reset the application must hear when it does not follow from what it was handed, else null.
   */
  confirm(channel: string, position: Position): ResetReason | null {
    const record = this.record(channel);
    const held = record.held;
    this.move(record, position);
    if (!held) return null;
    const order = comparePositions(position, held);
    if (order === null) return 'epoch_changed';
    if (order > 0) return 'gap';
    if (order < 0) return 'engine_rollback';
    return null;
  }
}
