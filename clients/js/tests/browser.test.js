// The client in a real headless Chromium against real Herald nodes on a real Redis: nodes killed,
// Redis restarted without its data, tokens expiring, channels added while publications flow, and
// Herald's demo page. The page comes from a small server of the tests' own (support/page-server.js)
// that also forwards `/v1/…` to a live node, as a load balancer would.
//
// Nothing here sleeps for a condition: every wait polls the page or the servers until a deadline.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { chromium } from 'playwright-core';
import { PageServer } from './support/page-server.js';
import { CHROMIUM, CHROMIUM_ARGS, DEADLINE_MS, Herald, Redis, until } from './support/processes.js';


/**
 * Publications each node keeps per channel (and so replays). Herald keeps 256 by default, and a page
 * that missed more is rightly reset, so it cannot have them all. The rolling restart publishes without
 * pause, as fast as the machine lets it, while its pages reconnect: how many a page misses depends on
 * the machine's speed. With a history that holds all it can publish (ROLLING_MAX per channel), a
 * missing publication there is a bug, never the history's bound.
 */
const HISTORY_SIZE = 20_000;
/** The most publications the rolling restart makes per channel: all of them fit in history. */
const ROLLING_MAX = 5000;
assert.ok(ROLLING_MAX < HISTORY_SIZE);

let redis;
let nodes = [];
let server;
let browser;

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing (apt-get install chromium; scripts/test does)`);
  redis = await Redis.start();
  nodes = await Promise.all([startNode(), startNode()]);
  server = await PageServer.start(() => nodes.map((node) => node.base));
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
});

after(async () => {
  await browser?.close();
  await server?.stop();
  await Promise.all(nodes.map((node) => node.stop()));
  await redis?.stop();
});

/** A fresh page (its own browser context) with the client loaded as `window.herald`. */
async function openPage(t) {
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(String(error)));
  t.after(() => assert.deepEqual(problems, [], 'no uncaught error in the page'));
  await page.goto(`${server.base}/test.html`);
  await page.waitForFunction(() => window.ready === true, null, { timeout: DEADLINE_MS });
  return page;
}

const rec = (page) => page.evaluate(() => window.rec);
const waitIn = (page, condition, arg) => page.waitForFunction(condition, arg, { timeout: DEADLINE_MS, polling: 25 });
const positions = (list) => list.map((p) => `${p.epoch}:${p.offset}`);
const messagesOf = (record, channel) => record.messages.filter((m) => m.channel === channel);

/**
 * Waits until the page was handed every publication in `answers` (channel → the publish answers, in
 * order), or one of those channels was reset (then it cannot have them all). Fails, at a reset or a
 * timeout, saying per channel which positions are missing and the last one the page holds, with the
 * page's connection states, resets and errors: a lost or stuck publication, a reset and a slow page
 * each look different.
 */
async function waitForAll(page, answers) {
  const want = Object.fromEntries(Object.entries(answers).map(([channel, list]) => [channel, positions(list)]));
  let failure;
  try {
    const outcome = await waitIn(
      page,
      (want) => {
        if (rec.resets.some((r) => r.channel in want)) return 'reset';
        const total = Object.values(want).reduce((sum, list) => sum + list.length, 0);
        if (rec.messages.length < total) return false; // the cheap check first: it runs every 25 ms
        return Object.entries(want).every(([channel, list]) => {
          const got = new Set(rec.messages.filter((m) => m.channel === channel).map((m) => `${m.epoch}:${m.offset}`));
          return list.every((p) => got.has(p));
        });
      },
      want,
    );
    if ((await outcome.jsonValue()) !== 'reset') return;
    failure = 'a channel was reset';
  } catch (error) {
    failure = error.message;
  }
  const seen = await rec(page);
  const lines = Object.entries(want).map(([channel, list]) => {
    const got = positions(messagesOf(seen, channel));
    const have = new Set(got);
    const missing = list.filter((p) => !have.has(p));
    const shown = missing.length > 20 ? [...missing.slice(0, 10), '…', ...missing.slice(-10)] : missing;
    return `${channel}: ${missing.length} of ${list.length} missing [${shown.join(', ')}]; the page holds ${got.length}, the last ${got.at(-1) ?? 'none'}`;
  });
  throw new Error(`${failure}\n${lines.join('\n')}\n${whatElse(seen)}`);
}

/** What the page's handlers saw besides publications: connection states (with nodes), resets, errors. */
function whatElse(seen) {
  const states = seen.states.map((s) => `${s.tag}:${s.state}${s.node ? `@${s.node}` : ''}${s.error ? `(${s.error})` : ''}`);
  return `states: ${states.join(' ')}\nresets: ${JSON.stringify(seen.resets)}\nerrors: ${JSON.stringify(seen.errors)}`;
}

/** A Herald node on the tests' Redis. */
function startNode() {
  return Herald.start({ engine: redis.url, env: { HERALD_HISTORY__SIZE: String(HISTORY_SIZE) } });
}

/** Replaces a node that a test killed, so the next test has two again. */
async function replace(victim) {
  const fresh = await startNode();
  nodes = nodes.map((node) => (node === victim ? fresh : node));
}

describe('herald-client in Chromium', () => {
  test('SSE: the node the page is connected to is killed; the page resumes on the other and loses nothing', async (t) => {
    const page = await openPage(t);
    const channel = 't:sse-kill';
    await page.evaluate((channel) => {
      const client = herald.createClient({ transport: 'sse', getToken: tokenFrom(`sub=sse-kill&channel=${channel}`) });
      window.sub = client.subscribe([channel], recorder());
    }, channel);
    await waitIn(page, () => rec.states.some((s) => s.state === 'open') && rec.subscribed.length === 1);
    const connectedTo = (await rec(page)).states.find((s) => s.state === 'open').node;
    const victim = nodes.find((node) => node.name === connectedTo);
    const survivor = nodes.find((node) => node !== victim);
    assert.ok(victim, `the page is on one of the test's nodes (${connectedTo})`);

    const answers = [];
    for (let i = 0; i < 10; i++) answers.push(await survivor.publish(channel, { i }));
    await waitIn(page, (n) => rec.messages.length >= n, answers.length);
    await victim.kill();
    // Published while the page has no connection: they must come back on resume.
    for (let i = 10; i < 30; i++) answers.push(await survivor.publish(channel, { i }));
    await waitIn(page, (n) => rec.messages.length >= n, answers.length);
    await waitIn(page, () => rec.states.filter((s) => s.state === 'open').length >= 2);
    for (let i = 30; i < 35; i++) answers.push(await survivor.publish(channel, { i }));
    await waitIn(page, (n) => rec.messages.length >= n, answers.length);

    const seen = await rec(page);
    assert.deepEqual(positions(messagesOf(seen, channel)), positions(answers), 'every publication once, in order');
    assert.deepEqual(seen.resets, [], 'nothing needed a reset');
    assert.equal(seen.states.filter((s) => s.state === 'open').at(-1).node, survivor.name);
    await page.evaluate(() => window.sub.close());
    await replace(victim);
  });

  test('WS: the node the socket is on is killed; the client resubscribes elsewhere with since and loses nothing', async (t) => {
    const page = await openPage(t);
    const channels = ['t:ws-kill-a', 't:ws-kill-b'];
    const before = server.streams.length;
    await page.evaluate((channels) => {
      const client = herald.createClient({ transport: 'ws', getToken: tokenFrom('sub=ws-kill&channel=t:ws-kill-*') });
      window.sub = client.subscribe(channels, recorder());
    }, channels);
    await waitIn(page, () => rec.subscribed.length === 2);
    const stream = server.streams.slice(before).find((s) => s.kind === 'ws' && s.open);
    const victim = nodes.find((node) => stream.upstream.startsWith(node.base));
    const survivor = nodes.find((node) => node !== victim);

    const answers = { 't:ws-kill-a': [], 't:ws-kill-b': [] };
    const publish = async (from, to) => {
      for (let i = from; i < to; i++) for (const channel of channels) answers[channel].push(await survivor.publish(channel, { i }));
    };
    await publish(0, 5);
    await waitIn(page, (n) => rec.messages.length >= n, 10);
    await victim.kill();
    await publish(5, 15);
    await waitIn(page, () => rec.states.filter((s) => s.state === 'open').length >= 2);
    await publish(15, 20);
    await waitIn(page, (n) => rec.messages.length >= n, 40);

    const seen = await rec(page);
    for (const channel of channels) {
      assert.deepEqual(positions(messagesOf(seen, channel)), positions(answers[channel]), `${channel}: all, once, in order`);
    }
    assert.deepEqual(seen.resets, []);
    assert.equal(seen.messages.length, 40, 'no duplicates');
    await page.evaluate(() => window.sub.close());
    await replace(victim);
  });

  test('WS: a subscription added while publications flow catches up through reconcile, then leaves', async (t) => {
    const page = await openPage(t);
    const [quiet, busy] = ['t:flow-quiet', 't:flow-busy'];
    await page.evaluate((quiet) => {
      window.client = herald.createClient({ transport: 'ws', getToken: tokenFrom('sub=flow&channel=t:flow-*') });
      window.first = client.subscribe([quiet], recorder('quiet'));
    }, quiet);
    await waitIn(page, () => rec.subscribed.length === 1);

    // The backend publishes to the busy channel without pause while the page joins it.
    const [publisher, other] = nodes;
    let publishing = true;
    const flow = (async () => {
      for (let i = 0; publishing && i < 2000; i++) await server.publish(publisher, busy, i);
    })();
    await until('publications flowing', () => server.state(busy).items.length >= 20);
    await page.evaluate((busy) => {
      window.shown = null; // the page's view of the busy channel: the snapshot, then each update
      const handlers = herald.reconcile({
        fetch: async (channel, signal) => {
          rec.fetches++;
          const body = await (await fetch(`/state?channel=${encodeURIComponent(channel)}`, { signal })).json();
          return { state: body.items, position: body.position };
        },
        onSnapshot: (channel, items) => {
          rec.snapshots.push({ channel, count: items.length });
          window.shown = [...items];
        },
        onMessage: (message) => window.shown.push(message.data.item),
        ...(() => {
          const r = recorder('busy');
          return { onReset: r.onReset, onState: r.onState, onSubscribed: r.onSubscribed, onError: r.onError };
        })(),
      });
      window.second = client.subscribe([busy], handlers);
    }, busy);
    await waitIn(page, () => rec.snapshots.length === 1);
    const joinedAt = server.state(busy).items.length;
    await until('more publications after the page joined', () => server.state(busy).items.length >= joinedAt + 50);
    publishing = false;
    await flow;
    const expected = server.state(busy).items;
    await waitIn(page, (n) => window.shown && window.shown.length >= n, expected.length).catch(async (error) => {
      const shown = (await page.evaluate(() => window.shown)) ?? [];
      const have = new Set(shown);
      const missing = expected.filter((item) => !have.has(item));
      const seen = await rec(page);
      throw new Error(
        `${error.message}\n${busy}: the page shows ${shown.length} of ${expected.length} items (the last ${shown.at(-1)}), ` +
          `missing [${missing.join(', ')}]; snapshots ${JSON.stringify(seen.snapshots)}, ${seen.fetches} loads\n${whatElse(seen)}`,
      );
    });
    assert.deepEqual(await page.evaluate(() => window.shown), expected, 'snapshot plus updates is the backend state, each once');
    const seen = await rec(page);
    // The backend stores a publication once Herald answered: a state it hands out meanwhile can miss
    // the newest one, which the stream started after; reconcile then loads it again.
    const behind = seen.errors.filter((e) => e.code === 'snapshot_behind');
    assert.equal(seen.fetches, 1 + behind.length, 'one load, and one more for each state behind the stream');
    assert.deepEqual(seen.resets, []);
    assert.deepEqual(seen.errors.filter((e) => e.code !== 'snapshot_behind'), []);

    // The first subscription still works on the same socket; the second one leaves Herald's presence.
    await other.publish(quiet, { hello: true });
    await waitIn(page, (channel) => rec.messages.some((m) => m.channel === channel), quiet);
    await page.evaluate(() => window.second.close());
    await until('the busy channel has no subscriber left', async () => {
      const { body } = await other.get(`/v1/presence?channel=${busy}`);
      return Array.isArray(body.connections) && body.connections.length === 0;
    });
    const { body } = await other.get(`/v1/presence?channel=${quiet}`);
    assert.equal(body.connections.length, 1, 'the socket itself stays, for the quiet channel');
    assert.equal(body.connections[0].transport, 'ws');
  });

  test('WS: the token is refreshed on the open socket before it expires', async (t) => {
    const page = await openPage(t);
    const channel = 't:ws-refresh';
    await page.evaluate((channel) => {
      const get = tokenFrom(`sub=ws-refresh&channel=${channel}&ttl=3`);
      rec.expiries = [];
      const getToken = async () => {
        const token = await get();
        rec.expiries.push(herald.tokenExpiry(token));
        return token;
      };
      window.sub = herald.createClient({ transport: 'ws', getToken }).subscribe([channel], recorder());
    }, channel);
    await waitIn(page, () => rec.subscribed.length === 1);
    // Past the first token's expiry (Herald would have closed the socket with 4003 without a refresh).
    await waitIn(page, () => rec.tokens >= 2 && Date.now() > rec.expiries[0] + 500);
    const answer = await nodes[0].publish(channel, { after: 'expiry' });
    await waitIn(page, (offset) => rec.messages.some((m) => m.offset === offset), answer.offset);
    const seen = await rec(page);
    assert.deepEqual(
      seen.states.map((s) => s.state),
      ['connecting', 'open'],
      'one connection throughout',
    );
    assert.deepEqual(seen.errors, []);
    await page.evaluate(() => window.sub.close());
  });

  test('SSE: when the token expires the stream reconnects with a fresh one and resumes', async (t) => {
    const page = await openPage(t);
    const channel = 't:sse-refresh';
    await page.evaluate((channel) => {
      const getToken = tokenFrom(`sub=sse-refresh&channel=${channel}&ttl=2`);
      window.sub = herald.createClient({ transport: 'sse', getToken }).subscribe([channel], recorder());
    }, channel);
    await waitIn(page, () => rec.subscribed.length === 1);
    const answers = [];
    // Publish until the page has been through an expiry and is connected again with a new token.
    await until(
      'a reconnect with a fresh token',
      async () => {
        answers.push(await nodes[1].publish(channel, { n: answers.length }));
        return page.evaluate(() => rec.tokens >= 2 && rec.states.filter((s) => s.state === 'open').length >= 2);
      },
      DEADLINE_MS,
      50,
    );
    for (let i = 0; i < 3; i++) answers.push(await nodes[1].publish(channel, { n: answers.length }));
    await waitIn(page, (n) => rec.messages.length >= n, answers.length);
    const seen = await rec(page);
    assert.deepEqual(positions(seen.messages), positions(answers), 'every publication once, in order');
    assert.deepEqual(seen.resets, []);
    assert.ok(!seen.errors.some((e) => e.code === 'unauthenticated'), 'the expired token was not tried again');
    await page.evaluate(() => window.sub.close());
  });

  test('offline, then hidden: the connections stop and resume from their positions when the page is back', async (t) => {
    const context = await browser.newContext();
    t.after(() => context.close());
    const page = await context.newPage();
    await page.goto(`${server.base}/test.html`);
    await page.waitForFunction(() => window.ready === true, null, { timeout: DEADLINE_MS });
    const channels = { sse: 't:away-sse', ws: 't:away-ws' };
    await page.evaluate((channels) => {
      window.subs = Object.entries(channels).map(([transport, channel]) =>
        herald
          .createClient({ transport, pauseWhenHiddenMs: 50, getToken: tokenFrom('sub=away&channel=t:away-*') })
          .subscribe([channel], recorder(transport)),
      );
    }, channels);
    await waitIn(page, () => rec.subscribed.length === 2);
    const answers = { [channels.sse]: [], [channels.ws]: [] };
    const publish = async (n) => {
      for (let i = 0; i < n; i++) for (const channel of Object.values(channels)) answers[channel].push(await nodes[0].publish(channel, i));
    };
    const bothIn = (state, n) => waitIn(page, ([state, n]) => ['sse', 'ws'].every((tag) => rec.states.filter((s) => s.tag === tag && s.state === state).length >= n), [state, n]);

    await publish(3);
    await waitIn(page, () => rec.messages.length === 6);
    await context.setOffline(true);
    await bothIn('offline', 1);
    await publish(3); // while offline: nothing can arrive
    assert.equal(await page.evaluate(() => rec.messages.length), 6);
    await context.setOffline(false);
    await bothIn('open', 2);

    // The page is hidden (as the browser reports it when the tab goes to the background).
    await page.evaluate(() => {
      Object.defineProperty(document, 'visibilityState', { value: 'hidden', configurable: true });
      document.dispatchEvent(new Event('visibilitychange'));
    });
    await bothIn('paused', 1);
    await publish(3);
    await page.evaluate(() => {
      Object.defineProperty(document, 'visibilityState', { value: 'visible', configurable: true });
      document.dispatchEvent(new Event('visibilitychange'));
    });
    await bothIn('open', 3);
    await publish(2);
    await waitIn(page, (n) => rec.messages.length >= n, 22);
    const seen = await rec(page);
    for (const channel of Object.values(channels)) {
      assert.deepEqual(positions(messagesOf(seen, channel)), positions(answers[channel]), `${channel}: all, once, in order`);
    }
    assert.deepEqual(seen.resets, []);
    for (const tag of ['sse', 'ws']) {
      assert.deepEqual(
        seen.states.filter((s) => s.tag === tag).map((s) => s.state + (s.error ? ` (${s.error})` : '')),
        ['connecting', 'open', 'offline', 'reconnecting', 'open', 'paused', 'reconnecting', 'open'],
        `${tag}: away is not a failure, and no retry runs meanwhile`,
      );
    }
    await page.evaluate(() => window.subs.forEach((sub) => sub.close()));
  });

  test("Herald's demo page subscribes and publishes through the client", async (t) => {
    const context = await browser.newContext();
    t.after(() => context.close());
    const page = await context.newPage();
    const problems = [];
    page.on('pageerror', (error) => problems.push(String(error)));
    await page.goto(`${server.base}/`);
    await page.fill('#sub-channels', 'user:demo');
    await page.fill('#pub-channel', 'user:demo');
    await page.click('#connect');
    await page.waitForFunction(() => document.getElementById('state').textContent === 'open', null, { timeout: DEADLINE_MS });
    await page.waitForFunction(() => document.getElementById('node').textContent !== '–', null, { timeout: DEADLINE_MS });
    await page.click('#publish');
    await page.waitForFunction(() => document.getElementById('c-received').textContent === '1', null, { timeout: DEADLINE_MS });
    await page.click('#publish10');
    await page.waitForFunction(() => document.getElementById('c-received').textContent === '11', null, { timeout: DEADLINE_MS });
    assert.equal(await page.textContent('#c-gaps'), '0');
    assert.equal(await page.textContent('#c-resets'), '0');
    assert.match(await page.textContent('#last-id'), /\S/);
    await page.click('#disconnect');
    assert.equal(await page.textContent('#state'), 'closed');
    assert.deepEqual(problems, []);
  });

  test('a rolling restart: each node drains in turn, SSE and WS pages follow and lose nothing', async (t) => {
    const page = await openPage(t);
    const channels = { sse: 't:roll-sse', ws: 't:roll-ws' };
    const before = server.streams.length;
    await page.evaluate((channels) => {
      window.subs = Object.entries(channels).map(([transport, channel]) =>
        herald
          .createClient({ transport, getToken: tokenFrom('sub=roll&channel=t:roll-*') })
          .subscribe([channel], recorder(transport)),
      );
    }, channels);
    await waitIn(page, () => rec.subscribed.length === 2);
    const onOld = server.streams.slice(before).filter((s) => s.open).map((s) => s.upstream);
    assert.ok(onOld.every((u) => nodes.some((node) => u.startsWith(node.base))), 'both pages are on the old nodes');
    // The replacement comes up; the publisher publishes through it throughout.
    const fresh = await startNode();
    const old = nodes;
    nodes = [...old, fresh];
    const answers = { [channels.sse]: [], [channels.ws]: [] };
    let publishing = true;
    // Whatever happens here, the publisher stops and the next test finds two nodes (this one stops the
    // two it had).
    t.after(async () => {
      publishing = false;
      while (nodes.length < 2) nodes.push(await startNode());
    });
    const flow = (async () => {
      for (let i = 0; publishing && i < ROLLING_MAX; i++) {
        for (const channel of Object.values(channels)) answers[channel].push(await fresh.publish(channel, { i }));
      }
    })();
    for (const node of old) {
      await node.stop(); // SIGTERM: readiness fails, clients are told to go, then it exits
      nodes = nodes.filter((n) => n !== node);
    }
    await waitIn(page, () => ['sse', 'ws'].every((tag) => rec.states.filter((s) => s.tag === tag && s.state === 'open').length >= 2));
    publishing = false;
    await flow;
    await waitForAll(page, answers);
    const seen = await rec(page);
    for (const channel of Object.values(channels)) {
      assert.deepEqual(positions(messagesOf(seen, channel)), positions(answers[channel]), `${channel}: all, once, in order`);
    }
    assert.deepEqual(seen.resets, []);
    const wsLost = seen.states.filter((s) => s.tag === 'ws' && s.state === 'reconnecting');
    assert.ok(wsLost.length > 0 && wsLost.every((s) => s.error === 'closed_1001'), `WS told to go with 1001 (1006: the node exited before its Close frame went out): ${JSON.stringify(wsLost)}`);
    await page.evaluate(() => window.subs.forEach((sub) => sub.close()));
  });

  // Last: it takes Redis (and so every channel's history) away.
  test('Redis restarts without persistence: the page is reset, reloads its state and goes on', async (t) => {
    const page = await openPage(t);
    const channels = { sse: 't:redis-sse', ws: 't:redis-ws' };
    await page.evaluate((channels) => {
      window.shown = {};
      for (const [transport, channel] of Object.entries(channels)) {
        const client = herald.createClient({ transport, getToken: tokenFrom('sub=redis&channel=t:redis-*') });
        const r = recorder(transport);
        client.subscribe(
          [channel],
          herald.reconcile({
            fetch: async (name, signal) => {
              rec.fetches++;
              const body = await (await fetch(`/state?channel=${encodeURIComponent(name)}`, { signal })).json();
              return { state: body.items, position: body.position };
            },
            onSnapshot: (name, items) => {
              rec.snapshots.push({ channel: name, count: items.length });
              window.shown[name] = [...items];
            },
            onMessage: (message) => {
              r.onMessage(message);
              window.shown[message.channel].push(message.data.item);
            },
            onReset: r.onReset,
            onState: r.onState,
            onSubscribed: r.onSubscribed,
            onError: r.onError,
          }),
        );
      }
    }, channels);
    await waitIn(page, () => rec.snapshots.length === 2);
    const names = Object.values(channels);
    for (let i = 0; i < 5; i++) for (const channel of names) await server.publish(nodes[i % 2], channel, `before-${i}`);
    const same = (names) =>
      names.every((name) => JSON.stringify(window.shown[name]) === JSON.stringify(window.expected[name]));
    const expect = async () => {
      await page.evaluate((expected) => (window.expected = expected), Object.fromEntries(names.map((n) => [n, server.state(n).items])));
    };
    await expect();
    await waitIn(page, same, names);

    await redis.restart();
    // Keep publishing (Herald answers 503 until it is back on Redis) until both channels were reset.
    let n = 0;
    await until(
      'a reset on both channels',
      async () => {
        for (const channel of names) await server.publish(nodes[n % 2], channel, `after-${n}`).catch(() => {});
        n++;
        return page.evaluate((names) => names.every((name) => rec.resets.some((r) => r.channel === name)), names);
      },
      DEADLINE_MS,
      100,
    );
    for (let i = 0; i < 3; i++) for (const channel of names) await server.publish(nodes[i % 2], channel, `later-${i}`);
    await expect();
    await waitIn(page, same, names);

    const seen = await rec(page);
    assert.ok(seen.fetches >= 4, `each channel loaded again after its reset (${seen.fetches} loads)`);
    for (const reset of seen.resets) {
      assert.ok(['epoch_changed', 'history_gone', 'engine_rollback'].includes(reset.reason), `reason ${reset.reason}`);
    }
    for (const channel of names) {
      const epochs = new Set(messagesOf(seen, channel).map((m) => m.epoch));
      assert.ok(epochs.size >= 2, `${channel} continued in a new epoch`);
    }
  });
});
