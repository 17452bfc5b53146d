// The example end to end: a redis-server, two Herald nodes on it (A and B, with an API key), the orders
// service as its own process publishing to them, and a browser's SSE stream on node A. Each test builds
// its own cluster, so a fault in one leaves nothing behind for the next.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Herald, Redis, Relay, Service, SseReader, until } from './support.js';

/** Starts Redis, node A on it, and node B on it directly or through a relay (`bEngine(redis)`). */
async function cluster({ bEngine } = {}) {
  const stops = [];
  const redis = await Redis.start();
  stops.push(() => redis.stop());
  try {
    const engine = `redis://127.0.0.1:${redis.port}/0`;
    const a = await Herald.start({ name: 'node-a', engine });
    stops.push(() => a.stop());
    const b = await Herald.start({ name: 'node-b', engine: bEngine ? await bEngine(redis, stops) : engine });
    stops.push(() => b.stop());
    return { redis, a, b, stops };
  } catch (error) {
    await stopAll(stops);
    throw error;
  }
}

async function stopAll(stops) {
  for (const stop of stops.reverse()) await stop();
}

/** An SSE subscriber on `node` for `channel`, past its `herald.connected`. */
async function subscribe(node, channel, stops) {
  const sse = await SseReader.open(`${node.base}/v1/sse?channel=${encodeURIComponent(channel)}`);
  stops.push(() => sse.close());
  const connected = await sse.next();
  assert.equal(connected.event, 'herald.connected');
  return sse;
}

/** The next event is `marker`, right after `offset`: nothing (no duplicate) came in between. */
async function expectNothingBeforeMarker(sse, node, channel, offset) {
  const marker = await node.publish(channel, { marker: true });
  const next = await sse.next();
  assert.equal(next.event, 'marker', `something arrived before the marker: ${JSON.stringify(next)}`);
  assert.equal(next.data.offset, offset + 1);
  assert.equal(marker.offset, offset + 1);
}

test('a payment made through the service reaches a browser connected to another node', async () => {
  const { a, b, stops } = await cluster();
  try {
    const sse = await subscribe(a, 'user:42', stops);
    // The service publishes to B first; the browser is on A.
    const service = await Service.start({ heraldUrls: [b.base, a.base] });
    stops.push(() => service.stop());

    const paid = await service.pay('8f3a', { user: '42', amount: 1999 }, 'checkout-7c1d');
    assert.equal(paid.status, 200, JSON.stringify(paid.body));
    assert.equal(paid.correlationId, 'checkout-7c1d');
    const { published, order } = paid.body;
    assert.equal(published.node, b.base);
    assert.equal(published.duplicate, false);
    assert.deepEqual(published.tries, [{ node: b.base, outcome: '200' }]);

    const event = await sse.next();
    assert.equal(event.event, 'order.paid');
    assert.equal(event.data.channel, 'user:42');
    assert.equal(event.data.epoch, published.epoch);
    assert.equal(event.data.offset, published.offset);
    assert.equal(event.data.correlation_id, 'checkout-7c1d');
    assert.deepEqual(event.data.data, { order: '8f3a', status: 'paid', amount: 1999, paid_at: order.paid_at });

    // A caller repeating the request (its own retry) publishes nothing new: same key, same position.
    const again = await service.pay('8f3a', { user: '42', amount: 1999 });
    assert.equal(again.status, 200, JSON.stringify(again.body));
    assert.equal(again.body.published.duplicate, true);
    assert.equal(again.body.published.offset, published.offset);
    assert.equal(again.body.published.epoch, published.epoch);
    await expectNothingBeforeMarker(sse, a, 'user:42', published.offset);

    // The state the browser reloads after a reset is the service's own.
    const state = await (await fetch(`${service.base}/orders/8f3a`)).json();
    assert.deepEqual(state.order, order);
    // Bad input is refused by the service before anything is published.
    const bad = await service.pay('8f3a', { user: 'no spaces', amount: 1 });
    assert.equal(bad.status, 400);
  } finally {
    await stopAll(stops);
  }
});

test('a node answering 503 is retried on the other node with the same idempotency key', async () => {
  let redisRelay;
  const { a, b, stops } = await cluster({
    bEngine: async (redis, stops) => {
      redisRelay = await Relay.start(redis.port);
      stops.push(() => redisRelay.stop());
      return redisRelay.url;
    },
  });
  try {
    const sse = await subscribe(a, 'user:7', stops);
    const service = await Service.start({ heraldUrls: [b.base, a.base] });
    stops.push(() => service.stop());
    // B loses Redis: it stays up and answers, but 503 engine_unavailable.
    redisRelay.cut();
    await until('node B not ready', async () => (await fetch(`${b.base}/readyz`)).status === 503);

    const paid = await service.pay('91c2', { user: '7', amount: 500 });
    assert.equal(paid.status, 200, JSON.stringify(paid.body));
    const { published } = paid.body;
    assert.deepEqual(published.tries, [
      { node: b.base, outcome: '503 engine_unavailable' },
      { node: a.base, outcome: '200' },
    ]);
    assert.equal(published.node, a.base);
    assert.equal(published.duplicate, false);
    const event = await sse.next();
    assert.equal(event.event, 'order.paid');
    assert.equal(event.data.offset, published.offset);
    await expectNothingBeforeMarker(sse, a, 'user:7', published.offset);
  } finally {
    await stopAll(stops);
  }
});

test('a node killed after publishing but before answering: the retry on the other node is a duplicate', async () => {
  const { a, b, stops } = await cluster();
  try {
    const sse = await subscribe(a, 'user:9', stops);
    // The service reaches B through a relay that, once B's answer is complete, kills B (SIGKILL, by its
    // PID) and cuts the service's connection: B published, the service never heard of it.
    let answerOfB = null;
    const relay = await Relay.start(b.port, {
      onAnswer: (received, client) => {
        if (answerOfB === null && /\r\n\r\n\{.*\}$/s.test(received)) {
          answerOfB = JSON.parse(received.slice(received.indexOf('\r\n\r\n') + 4));
          b.kill().then(() => client.destroy());
        }
      },
    });
    stops.push(() => relay.stop());
    const service = await Service.start({ heraldUrls: [relay.base, a.base] });
    stops.push(() => service.stop());

    const paid = await service.pay('c0ff', { user: '9', amount: 250 });
    assert.equal(paid.status, 200, JSON.stringify(paid.body));
    const { published } = paid.body;
    assert.ok(answerOfB, 'B answered the first attempt');
    assert.equal(answerOfB.duplicate, false);
    assert.notEqual(b.child.signalCode, null, 'B was killed');
    // First attempt: no answer (the connection was cut); the retry on A got B's publication back.
    assert.equal(published.tries.length, 2, JSON.stringify(published.tries));
    assert.equal(published.tries[0].node, relay.base);
    assert.notEqual(published.tries[0].outcome, '200');
    assert.deepEqual(published.tries[1], { node: a.base, outcome: '200' });
    assert.equal(published.duplicate, true);
    assert.equal(published.offset, answerOfB.offset);
    assert.equal(published.epoch, answerOfB.epoch);

    // The browser on A got the payment once, at that offset, and nothing else.
    const event = await sse.next();
    assert.equal(event.event, 'order.paid');
    assert.equal(event.data.offset, answerOfB.offset);
    await expectNothingBeforeMarker(sse, a, 'user:9', answerOfB.offset);
  } finally {
    await stopAll(stops);
  }
});
