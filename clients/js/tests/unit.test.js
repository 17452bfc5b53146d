// The client's logic on its own, through the built bundle (dist/herald-client.js, what pages load):
// positions and duplicates, backoff, URLs, tokens, and the reconcile helper's buffering.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { describe, test } from 'node:test';
import {
  Backoff,
  backoffDelay,
  comparePositions,
  createClient,
  drainDelay,
  HeraldError,
  isChannelName,
  isCovered,
  PositionTracker,
  reconcile,
  sseUrl,
  TokenSource,
  tokenExpiry,
  wsUrl,
} from '../dist/herald-client.js';
import { until } from './support/processes.js';

const at = (epoch, offset) => ({ epoch, offset });
const msg = (channel, epoch, offset, data = offset) => ({
  channel,
  epoch,
  offset,
  event: 'message',
  data,
  correlation_id: 'c',
  published_at: '2026-01-01T00:00:00.000Z',
});

describe('positions', () => {
  test('compare by offset within an epoch; across epochs there is no order', () => {
    assert.equal(comparePositions(at('E', 1), at('E', 2)), -1);
    assert.equal(comparePositions(at('E', 2), at('E', 2)), 0);
    assert.equal(comparePositions(at('E', 9), at('E', 2)), 1);
    assert.equal(comparePositions(at('E', 1), at('F', 9)), null);
    assert.equal(isCovered(at('E', 2), at('E', 2)), true);
    assert.equal(isCovered(at('E', 3), at('E', 2)), false);
    assert.equal(isCovered(at('F', 1), at('E', 2)), false);
    assert.equal(isCovered(at('E', 1), null), false);
  });

  test('the tracker hands each position over once, in order', () => {
    const tracker = new PositionTracker();
    assert.deepEqual(tracker.accept(msg('c', 'E', 4)), { kind: 'deliver' }, 'the first one sets the position');
    assert.deepEqual(tracker.accept(msg('c', 'E', 5)), { kind: 'deliver' });
    assert.deepEqual(tracker.accept(msg('c', 'E', 5)), { kind: 'duplicate' });
    assert.deepEqual(tracker.accept(msg('c', 'E', 3)), { kind: 'duplicate' });
    assert.deepEqual(tracker.get('c'), at('E', 5));
    assert.deepEqual(tracker.accept(msg('other', 'E', 1)), { kind: 'deliver' }, 'channels are independent');
  });

  test('a jump or a new epoch that Herald did not announce becomes a reset', () => {
    const tracker = new PositionTracker();
    tracker.accept(msg('c', 'E', 1));
    assert.deepEqual(tracker.accept(msg('c', 'E', 4)), { kind: 'reset-then-deliver', reason: 'gap', position: at('E', 3) });
    assert.deepEqual(tracker.accept(msg('c', 'F', 1)), {
      kind: 'reset-then-deliver',
      reason: 'epoch_changed',
      position: at('F', 0),
    });
    assert.deepEqual(tracker.accept(msg('c', 'E', 5)), { kind: 'stale' }, 'an epoch left behind stays behind');
    assert.deepEqual(tracker.get('c'), at('F', 1));
  });

  test('a reset sets where delivery continues', () => {
    const tracker = new PositionTracker();
    tracker.accept(msg('c', 'E', 7));
    tracker.reset('c', at('F', 0));
    assert.deepEqual(tracker.accept(msg('c', 'F', 1)), { kind: 'deliver' });
    assert.deepEqual(tracker.accept(msg('c', 'E', 8)), { kind: 'stale' });
    tracker.forget('c');
    assert.equal(tracker.get('c'), undefined);
  });

  test('a confirmed position that does not follow from what was handed over is a reset', () => {
    const tracker = new PositionTracker();
    assert.equal(tracker.confirm('c', at('E', 3)), null, 'a fresh subscription starts anywhere');
    assert.equal(tracker.confirm('c', at('E', 3)), null, 'resumed exactly');
    assert.equal(tracker.confirm('c', at('E', 5)), 'gap');
    assert.equal(tracker.confirm('c', at('E', 2)), 'engine_rollback');
    assert.equal(tracker.confirm('c', at('G', 2)), 'epoch_changed');
  });
});

describe('backoff', () => {
  const fixed = (value) => ({ minDelayMs: 100, maxDelayMs: 1000, random: () => value });

  test('grows exponentially between half and all of its ceiling, capped', () => {
    assert.equal(backoffDelay(1, fixed(0)), 50);
    assert.equal(backoffDelay(1, fixed(1)), 100);
    assert.equal(backoffDelay(2, fixed(1)), 200);
    assert.equal(backoffDelay(4, fixed(0.5)), 600);
    assert.equal(backoffDelay(10, fixed(1)), 1000);
    assert.equal(backoffDelay(10, fixed(0)), 500);
    assert.equal(backoffDelay(1000, fixed(1)), 1000, 'no overflow');
  });

  test('a server hint is a floor, up to the cap', () => {
    assert.equal(backoffDelay(1, fixed(0), 700), 700);
    assert.equal(backoffDelay(1, fixed(0), 5000), 1000);
  });

  test('jitter spreads clients out', () => {
    const delays = new Set();
    for (let i = 0; i < 50; i++) delays.add(backoffDelay(3, { minDelayMs: 100, maxDelayMs: 10000, random: Math.random }));
    assert.ok(delays.size > 10);
    for (const delay of delays) assert.ok(delay >= 200 && delay <= 400, `${delay} in [200, 400]`);
  });

  test('counts attempts and starts over after a success', () => {
    const backoff = new Backoff(fixed(1));
    assert.deepEqual([backoff.next(), backoff.next(), backoff.next()], [100, 200, 400]);
    assert.equal(backoff.attempt, 3);
    backoff.reset();
    assert.equal(backoff.next(), 100);
  });

  test('a drain waits only a random part of its jitter', () => {
    assert.equal(drainDelay(500, () => 0), 0);
    assert.equal(drainDelay(500, () => 0.5), 250);
    assert.equal(drainDelay(500, () => 7), 500, 'a bad random number is clamped');
  });
});

describe('URLs', () => {
  test('SSE: one channel parameter each, token and cursor in the query', () => {
    const url = new URL(sseUrl('https://h.example/', ['user:42', 'order:8f3a'], { token: 't.k.n', lastEventId: '1.2e.X-3' }));
    assert.equal(url.pathname, '/v1/sse');
    assert.deepEqual(url.searchParams.getAll('channel'), ['user:42', 'order:8f3a']);
    assert.equal(url.searchParams.get('token'), 't.k.n');
    assert.equal(url.searchParams.get('last_event_id'), '1.2e.X-3');
    assert.equal(new URL(sseUrl('https://h.example', ['a'])).search, '?channel=a', 'nothing else when not needed');
  });

  test('relative bases, path prefixes and channel characters', () => {
    const page = 'https://app.example/orders/7?tab=1';
    assert.equal(sseUrl('', ['a'], { page }), 'https://app.example/v1/sse?channel=a');
    assert.equal(sseUrl('/herald', ['a'], { page }), 'https://app.example/herald/v1/sse?channel=a');
    assert.equal(sseUrl('https://h.example/rt/', ['a'], { page }), 'https://h.example/rt/v1/sse?channel=a');
    const odd = 'a-b_c:d.e@f=g/h';
    assert.deepEqual(new URL(sseUrl('https://h.example', [odd])).searchParams.getAll('channel'), [odd]);
  });

  test('WebSocket: the scheme follows the base', () => {
    assert.equal(wsUrl('http://127.0.0.1:8080'), 'ws://127.0.0.1:8080/v1/ws');
    assert.equal(wsUrl('https://h.example/rt', { token: 'abc' }), 'wss://h.example/rt/v1/ws?token=abc');
    assert.equal(wsUrl('/', { page: 'https://app.example/x' }), 'wss://app.example/v1/ws');
  });

  test('channel names as the protocol allows them', () => {
    assert.ok(isChannelName('user:42'));
    assert.ok(isChannelName('a'.repeat(255)));
    assert.ok(!isChannelName(''));
    assert.ok(!isChannelName('a'.repeat(256)));
    assert.ok(!isChannelName('bad name'));
    assert.ok(!isChannelName('é'));
    assert.throws(() => createClient().subscribe(['ok', 'not ok']), (e) => e instanceof HeraldError && e.code === 'invalid_channel');
    assert.throws(() => createClient().subscribe([]), HeraldError);
  });
});

describe('tokens', () => {
  const jwt = (claims) => {
    const part = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
    const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
    return `${body}.${createHmac('sha256', 'k').update(body).digest('base64url')}`;
  };

  test('the expiry is read from the exp claim', () => {
    assert.equal(tokenExpiry(jwt({ sub: 'a', exp: 1700000000 })), 1700000000 * 1000);
    assert.equal(tokenExpiry(jwt({ sub: 'a' })), null);
    assert.equal(tokenExpiry('not a jwt'), null);
    assert.equal(tokenExpiry('a.@@@.c'), null);
    assert.equal(tokenExpiry(null), null);
  });

  test('a token is reused until it is due, at most half its lifetime before expiry', async () => {
    let now = 1_000_000;
    let calls = 0;
    const source = new TokenSource(
      () => {
        calls++;
        return jwt({ sub: 'a', exp: Math.floor(now / 1000) + 10 });
      },
      30_000,
      () => now,
    );
    const first = await source.get();
    assert.equal(calls, 1);
    assert.equal(source.refreshAt(), 1_005_000, 'half of the 10 s lifetime, not 30 s, before expiry');
    now += 4_000;
    assert.equal(await source.get(), first, 'not due yet');
    assert.equal(calls, 1);
    now += 1_000;
    assert.ok(source.due());
    await source.get();
    assert.equal(calls, 2);
    source.invalidate();
    await source.get();
    assert.equal(calls, 3, 'a refused token is not used again');
    assert.ok(!source.expired());
    now += 10_000;
    assert.ok(source.expired());
  });

  test('concurrent callers share one getToken call; no provider means anonymous', async () => {
    let calls = 0;
    const source = new TokenSource(async () => {
      calls++;
      return 'opaque-token';
    }, 30_000);
    const [a, b] = await Promise.all([source.fresh(), source.fresh()]);
    assert.equal(calls, 1);
    assert.equal(a, b);
    assert.equal(source.refreshAt(), null, 'an opaque token is never refreshed ahead');
    assert.equal(await new TokenSource(undefined, 1).get(), null);
    assert.equal(await new TokenSource(() => '', 1).get(), null, 'an empty token is no token');
  });
});

/** A fetch the test answers by hand. */
function manualFetch() {
  const calls = [];
  const fetch = (channel, signal, cause) =>
    new Promise((resolve, reject) => calls.push({ channel, signal, cause, resolve, reject }));
  return { calls, fetch };
}

describe('reconcile', () => {
  function setup(extra = {}) {
    const { calls, fetch } = manualFetch();
    const seen = [];
    const handlers = reconcile({
      fetch,
      onSnapshot: (channel, state, position) => seen.push({ snapshot: state, channel, position }),
      onMessage: (m) => seen.push(`${m.channel}@${m.epoch}:${m.offset}`),
      onError: (e) => seen.push({ error: e.code }),
      ...extra,
    });
    return { calls, seen, handlers };
  }

  test('loads once the channel is live and holds publications back until the state is in', async () => {
    const { calls, seen, handlers } = setup();
    handlers.onSubscribed('c', null);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].cause, 'subscribed');
    assert.ok(handlers.loading('c'));
    for (let offset = 1; offset <= 4; offset++) handlers.onMessage(msg('c', 'E', offset));
    assert.deepEqual(seen, [], 'held back');
    calls[0].resolve({ state: 'S2', position: at('E', 2) });
    await until('the snapshot', () => seen.length > 0);
    assert.deepEqual(seen, [{ snapshot: 'S2', channel: 'c', position: at('E', 2) }, 'c@E:3', 'c@E:4']);
    assert.ok(!handlers.loading('c'));
    handlers.onMessage(msg('c', 'E', 5));
    assert.equal(seen.at(-1), 'c@E:5', 'live after that');
  });

  test('the state may be ahead of the stream: what it includes is not applied again', async () => {
    const { calls, seen, handlers } = setup();
    handlers.onSubscribed('c', null);
    handlers.onMessage(msg('c', 'E', 1));
    calls[0].resolve({ state: 'S5', position: at('E', 5) });
    await until('the snapshot', () => seen.length > 0);
    for (let offset = 2; offset <= 6; offset++) handlers.onMessage(msg('c', 'E', offset));
    assert.deepEqual(seen.slice(1), ['c@E:6']);
  });

  test('without a position every publication held back is handed over', async () => {
    const { calls, seen, handlers } = setup();
    handlers.onSubscribed('c', null);
    handlers.onMessage(msg('c', 'E', 1));
    handlers.onMessage(msg('c', 'E', 2));
    calls[0].resolve({ state: 'S?' });
    await until('the snapshot', () => seen.length > 0);
    assert.deepEqual(seen, [{ snapshot: 'S?', channel: 'c', position: null }, 'c@E:1', 'c@E:2']);
  });

  test('a position of another epoch does not hide publications of this one', async () => {
    const { calls, seen, handlers } = setup();
    handlers.onSubscribed('c', null);
    handlers.onMessage(msg('c', 'F', 1));
    calls[0].resolve({ state: 'old', position: at('E', 40) });
    await until('the snapshot', () => seen.length > 0);
    assert.deepEqual(seen.slice(1), ['c@F:1']);
  });

  test('a reset during a load starts another one and drops what was held back', async () => {
    const resets = [];
    const { calls, seen, handlers } = setup({ onReset: (...args) => resets.push(args) });
    handlers.onSubscribed('c', null);
    handlers.onMessage(msg('c', 'E', 1));
    handlers.onReset('c', at('F', 0), 'epoch_changed');
    assert.deepEqual(resets, [['c', at('F', 0), 'epoch_changed']]);
    assert.equal(calls.length, 2);
    assert.equal(calls[1].cause, 'reset');
    assert.ok(calls[0].signal.aborted, 'the first load is aborted');
    calls[0].resolve({ state: 'stale', position: null });
    handlers.onMessage(msg('c', 'F', 1));
    calls[1].resolve({ state: 'fresh', position: at('F', 0) });
    await until('the snapshot', () => seen.length > 0);
    assert.deepEqual(seen, [{ snapshot: 'fresh', channel: 'c', position: at('F', 0) }, 'c@F:1']);
  });

  test('a failed load is retried and the publications wait', async () => {
    const { calls, seen, handlers } = setup({ retryDelayMs: 1 });
    handlers.onSubscribed('c', null);
    handlers.onMessage(msg('c', 'E', 1));
    calls[0].reject(new Error('backend down'));
    await until('the retry', () => calls.length === 2);
    assert.deepEqual(seen, [{ error: 'fetch_failed' }]);
    assert.equal(calls[1].cause, 'retry');
    handlers.onMessage(msg('c', 'E', 2));
    calls[1].resolve({ state: 'S0', position: at('E', 0) });
    await until('the snapshot', () => seen.length > 1);
    assert.deepEqual(seen.slice(1), [{ snapshot: 'S0', channel: 'c', position: at('E', 0) }, 'c@E:1', 'c@E:2']);
  });

  test('too much held back: the load in flight is already old, so another follows it', async () => {
    const { calls, seen, handlers } = setup({ maxBuffered: 2 });
    handlers.onSubscribed('c', null);
    for (let offset = 1; offset <= 3; offset++) handlers.onMessage(msg('c', 'E', offset));
    calls[0].resolve({ state: 'S0', position: at('E', 0) });
    await until('the second load', () => calls.length === 2);
    assert.deepEqual(seen, []);
    handlers.onMessage(msg('c', 'E', 4));
    calls[1].resolve({ state: 'S3', position: at('E', 3) });
    await until('the snapshot', () => seen.length > 0);
    assert.deepEqual(seen, [{ snapshot: 'S3', channel: 'c', position: at('E', 3) }, 'c@E:4']);
  });

  test('a state behind where the stream starts is loaded again: the publications in between would be lost', async () => {
    const { calls, seen, handlers } = setup({ retryDelayMs: 1 });
    // Over WebSocket the stream starts after 5: the backend had not stored 5 yet when it answered.
    handlers.onSubscribed('c', at('E', 5));
    handlers.onMessage(msg('c', 'E', 6));
    calls[0].resolve({ state: 'S4', position: at('E', 4) });
    await until('the second load', () => calls.length === 2);
    assert.equal(calls[1].cause, 'retry');
    assert.deepEqual(seen, [{ error: 'snapshot_behind' }], 'the state behind is not shown');
    handlers.onMessage(msg('c', 'E', 7));
    calls[1].resolve({ state: 'S5', position: at('E', 5) });
    await until('the snapshot', () => seen.length > 1);
    assert.deepEqual(seen.slice(1), [{ snapshot: 'S5', channel: 'c', position: at('E', 5) }, 'c@E:6', 'c@E:7']);
  });

  test('without a start position, the first publication after the state tells that it is behind', async () => {
    const { calls, seen, handlers } = setup({ retryDelayMs: 1 });
    handlers.onSubscribed('c', null); // SSE: no position
    calls[0].resolve({ state: 'S3', position: at('E', 3) });
    await until('the snapshot', () => seen.length > 0);
    handlers.onMessage(msg('c', 'E', 5)); // 4 was published before the stream started
    await until('the second load', () => calls.length === 2);
    handlers.onMessage(msg('c', 'E', 6));
    calls[1].resolve({ state: 'S4', position: at('E', 4) });
    await until('the second snapshot', () => seen.length > 2);
    assert.deepEqual(seen, [
      { snapshot: 'S3', channel: 'c', position: at('E', 3) },
      { error: 'snapshot_behind' },
      { snapshot: 'S4', channel: 'c', position: at('E', 4) },
      'c@E:5',
      'c@E:6',
    ]);
    handlers.onMessage(msg('c', 'E', 7));
    assert.equal(seen.at(-1), 'c@E:7', 'checked once: live after that');
  });

  test('a state that stays behind is taken as it is after three more loads', async () => {
    const { calls, seen, handlers } = setup({ retryDelayMs: 1 });
    handlers.onSubscribed('c', at('E', 9));
    for (let load = 0; load < 4; load++) {
      await until(`load ${load + 1}`, () => calls.length === load + 1);
      calls[load].resolve({ state: `S${load}`, position: at('E', 2) });
    }
    await until('the snapshot', () => seen.some((s) => s.snapshot));
    handlers.onMessage(msg('c', 'E', 10));
    assert.deepEqual(seen.filter((s) => s.error).length, 3);
    assert.deepEqual(seen.slice(3), [{ snapshot: 'S3', channel: 'c', position: at('E', 2) }, 'c@E:10']);
  });

  test('channels are reconciled independently, and closing stops the loads', async () => {
    const { calls, seen, handlers } = setup();
    handlers.onSubscribed('a', null);
    handlers.onSubscribed('b', null);
    calls[1].resolve({ state: 'B', position: null });
    await until('b', () => seen.length > 0);
    handlers.onMessage(msg('b', 'E', 1));
    handlers.onMessage(msg('a', 'E', 1));
    assert.deepEqual(seen, [{ snapshot: 'B', channel: 'b', position: null }, 'b@E:1']);
    handlers.onState('closed', { transport: 'ws', url: '', attempt: 0 });
    assert.ok(calls[0].signal.aborted);
    calls[0].resolve({ state: 'A', position: null });
    await Promise.resolve();
    assert.equal(seen.length, 2, 'nothing after close');
  });
});

test('subscribe never calls a handler before it returns', async () => {
  const calls = [];
  class NoEventSource {
    static CLOSED = 2;
    constructor(url) {
      calls.push(`open ${url}`);
      this.readyState = 0;
    }
    addEventListener() {}
    close() {
      calls.push('close');
    }
  }
  const client = createClient({ url: 'http://127.0.0.1:9', EventSource: NoEventSource });
  const sub = client.subscribe('a', { onState: (state) => calls.push(state) });
  assert.deepEqual(calls, []);
  await until('the connection starts', () => calls.length >= 2);
  assert.deepEqual(calls, ['connecting', 'open http://127.0.0.1:9/v1/sse?channel=a']);
  sub.close();
  assert.deepEqual(calls.slice(2), ['close', 'closed']);
  assert.equal(sub.state, 'closed');
});
