// The reconcile pattern: load a channel's authoritative state from the application's own backend when
// the channel goes live and after every reset, and hold live publications back while that load runs,
// so that none published in between is lost and none the state already reflects is applied again.

import { backoffDelay } from './backoff.js';
import { call, report } from './dispatch.js';
import { isCovered } from './position.js';
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

interface ChannelLoad {
  loading: boolean;
  generation: number;
  controller: AbortController | null;
  buffer: Message[];
  /** The buffer overflowed: the state loading now is already too old; load again when it lands. */
  again: boolean;
  failures: number;
  retry: ReturnType<typeof setTimeout> | null;
  /** Publications at or below this position are in the state the application holds. */
  floor: Position | null;
  /**
   * Where the live stream starts: publications at or below it never arrive (WebSocket `subscribed`,
   * a reset). A state that does not reach it lacks some: it is loaded again.
   */
  start: Position | null;
  /** The state landed with a position and no publication after it has been seen yet. */
  unchecked: boolean;
  /** Loads in a row that came back behind the stream. */
  behind: number;
}

/** Loads in a row that may come back behind the stream before the last one is taken as it is. */
const MAX_BEHIND = 3;

/** Handlers to pass to `subscribe`, plus what the reconcile helper knows. */
export interface ReconcileHandlers<T> extends Handlers<T> {
  /** True while the channel's state is being loaded (its publications are held back). */
  loading(channel: string): boolean;
  /** Stops every load in flight (also done when the subscription closes). */
  dispose(): void;
}

/** The position right before `message` (where the stream was when it came). */
function before(message: Position): Position {
  return { epoch: message.epoch, offset: message.offset - 1 };
}

/** `next` when a state at `position` does not include it (same epoch, further on), else null. */
function lacks(position: Position, next: Position | null | undefined): Position | null {
  if (!next || next.epoch !== position.epoch || next.offset <= position.offset) return null;
  return next;
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
export function reconcile<T = unknown, S = unknown>(options: ReconcileOptions<T, S>): ReconcileHandlers<T> {
  const channels = new Map<string, ChannelLoad>();
  const maxBuffered = options.maxBuffered ?? 10_000;
  const retryDelay = { minDelayMs: options.retryDelayMs ?? 1000, maxDelayMs: 30_000, random: Math.random };
  let disposed = false;

  function record(channel: string): ChannelLoad {
    let load = channels.get(channel);
    if (!load) {
      load = {
        loading: false,
        generation: 0,
        controller: null,
        buffer: [],
        again: false,
        failures: 0,
        retry: null,
        floor: null,
        start: null,
        unchecked: false,
        behind: 0,
      };
      channels.set(channel, load);
    }
    return load;
  }

  function stop(load: ChannelLoad): void {
    load.generation++;
    load.controller?.abort();
    load.controller = null;
    if (load.retry !== null) clearTimeout(load.retry);
    load.retry = null;
  }

  /** Starts a load; `fresh` drops what was held back (a reset made it worthless). */
  function start(channel: string, cause: LoadCause, fresh: boolean): void {
    if (disposed) return;
    const load = record(channel);
    stop(load);
    if (fresh) {
      load.buffer = [];
      load.failures = 0;
      load.floor = null;
      load.behind = 0;
    }
    load.unchecked = false;
    load.loading = true;
    load.again = false;
    const generation = load.generation;
    const controller = new AbortController();
    load.controller = controller;
    let pending: Promise<Snapshot<S>>;
    try {
      pending = Promise.resolve(options.fetch(channel, controller.signal, cause));
    } catch (error) {
      pending = Promise.reject(error);
    }
    pending.then(
      (snapshot) => {
        if (disposed || load.generation !== generation) return;
        load.controller = null;
        if (load.again) {
          start(channel, 'retry', true);
          return;
        }
        land(channel, load, snapshot);
      },
      (error: unknown) => {
        if (disposed || load.generation !== generation) return;
        load.controller = null;
        load.failures += 1;
        const delay = backoffDelay(load.failures, retryDelay);
        call(
          options.onError,
          new HeraldError('fetch_failed', `loading ${channel} failed (retry in ${delay} ms): ${String(error)}`, {
            channel,
          }),
        );
        load.retry = setTimeout(() => {
          load.retry = null;
          if (load.generation === generation) start(channel, 'retry', load.again);
        }, delay);
      },
    );
  }

  function land(channel: string, load: ChannelLoad, snapshot: Snapshot<S>): void {
    const position = snapshot && snapshot.position ? { epoch: snapshot.position.epoch, offset: snapshot.position.offset } : null;
    // A backend that stores the publish answer's position after Herald accepted the publication can
    // answer with a state that misses the newest ones, which the stream started after: load again.
    const first = position ? load.buffer.find((m) => !isCovered(m, position)) : undefined;
    const missing = position ? lacks(position, load.start) || (first && lacks(position, before(first))) : null;
    if (missing && load.behind < MAX_BEHIND) {
      behind(channel, load, position as Position, missing);
      return;
    }
    load.behind = 0;
    // Taken as it is after too many loads behind; else the first publication after it checks it.
    load.unchecked = !missing && position !== null && first === undefined;
    load.loading = false;
    load.failures = 0;
    load.floor = position;
    const held = load.buffer;
    load.buffer = [];
    try {
      options.onSnapshot(channel, snapshot?.state as S, position);
    } catch (error) {
      report(error);
    }
    for (const message of held) deliver(load, message);
  }

  /** The state at `position` lacks `missing` (where the stream is known to go on from): load again. */
  function behind(channel: string, load: ChannelLoad, position: Position, missing: Position): void {
    load.behind += 1;
    const delay = backoffDelay(load.behind, retryDelay);
    call(
      options.onError,
      new HeraldError(
        'snapshot_behind',
        `the state of ${channel} is at ${position.epoch}:${position.offset}, the stream goes on after ` +
          `${missing.epoch}:${missing.offset}: loading it again in ${delay} ms`,
        { channel },
      ),
    );
    stop(load);
    load.loading = true;
    load.unchecked = false;
    const generation = load.generation;
    load.retry = setTimeout(() => {
      load.retry = null;
      if (load.generation === generation) start(channel, 'retry', false);
    }, delay);
  }

  function deliver(load: ChannelLoad, message: Message): void {
    if (isCovered(message, load.floor)) return;
    if (load.unchecked) {
      // The first publication after the state: it must follow it, or the state lacks those between.
      load.unchecked = false;
      const missing = load.floor ? lacks(load.floor, before(message)) : null;
      if (missing && load.behind < MAX_BEHIND) {
        const channel = message.channel;
        behind(channel, load, load.floor as Position, missing);
        load.buffer.push(message);
        return;
      }
    }
    call(options.onMessage as ((m: Message) => void) | undefined, message);
  }

  const handlers: ReconcileHandlers<T> = {
    onSubscribed(channel, position) {
      call(options.onSubscribed, channel, position);
      if (channels.has(channel)) return;
      record(channel).start = position ? { epoch: position.epoch, offset: position.offset } : null;
      start(channel, 'subscribed', true);
    },
    onReset(channel, position, reason) {
      call(options.onReset, channel, position, reason);
      record(channel).start = position ? { epoch: position.epoch, offset: position.offset } : null;
      start(channel, 'reset', true);
    },
    onMessage(message) {
      const load = channels.get(message.channel);
      if (!load) {
        call(options.onMessage, message);
        return;
      }
      if (!load.loading) {
        deliver(load, message);
        return;
      }
      if (load.buffer.length >= maxBuffered) {
        // Too much held back: the state being loaded is already behind. Drop what is held and load
        // again once this load lands (that later state includes everything dropped).
        load.buffer = [];
        load.again = true;
        return;
      }
      load.buffer.push(message as Message);
    },
    onState(state, info) {
      call(options.onState, state, info);
      if (state === 'closed') handlers.dispose(); // closed is final: by the application, or refused for good
    },
    onError(error) {
      call(options.onError, error);
    },
    loading(channel) {
      return channels.get(channel)?.loading ?? false;
    },
    dispose() {
      disposed = true;
      for (const load of channels.values()) stop(load);
      channels.clear();
    },
  };
  return handlers;
}
