// The example's page in a real headless Chromium (/usr/bin/chromium), driven like a user: the `demo`
// binary (three replicas behind the balancer, the external system, SQLite) on a free port, with a
// redis-server of this test's own on another free port (no persistence, a scratch folder), never the
// machine's. The page is clicked ("Start 10 jobs", "Start a job", "Compare with the database") and
// read from its table; what it shows is compared with the app's own `GET /api/jobs`.
//
// - Redis: every job the user starts turns `done` on the page, and the page equals the database.
// - Naive (`--naive`): the database has every job done, but the page shows exactly those whose webhook
//   landed on the replica holding its stream; the others stay `pending` with nothing telling the page,
//   until "Compare with the database" marks them, and a reload shows them done.
// - Redis killed and started again empty mid-run: jobs finishing meanwhile are saved but not published;
//   the page gets a reset, re-fetches, and shows every job done.
//
// Jobs take the demo's own 2-5 s. Nothing sleeps for a condition: every wait polls the page or the app
// until a deadline. playwright-core comes from clients/js/node_modules (no npm install of its own).
//
// The binary: TEST_BFF_BIN, else ${CARGO_TARGET_DIR:-target}/debug/herald-example-bff (what `cargo
// test --workspace` builds; a relative CARGO_TARGET_DIR is taken from the repository's root).
// Run with examples/bff/browser-test.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { CHROMIUM, CHROMIUM_ARGS, Redis, stopChild, until } from '../../clients/js/tests/support/processes.js';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const { chromium } = createRequire(join(repo, 'clients', 'js', 'package.json'))('playwright-core');

/** Bound of every wait for a condition (a job takes at most 5 s, a webhook retry waits at most 2 s). */
const DEADLINE_MS = 30_000;

function bffBinary() {
  if (process.env.TEST_BFF_BIN) return resolve(process.env.TEST_BFF_BIN);
  const target = process.env.CARGO_TARGET_DIR || 'target';
  return join(isAbsolute(target) ? target : join(repo, target), 'debug', 'herald-example-bff');
}

/** Whether `child` has exited. */
function exited(child) {
  return child.exitCode !== null || child.signalCode !== null;
}

/** The example's `demo` command: the balancer on a free port, its URL read from what it prints. */
class Demo {
  static async start(args, dir) {
    const binary = bffBinary();
    assert.ok(existsSync(binary), `no ${binary}: build it (cargo build -p herald-example-bff) or set TEST_BFF_BIN`);
    // TMPDIR: the demo keeps its SQLite file (and, without --redis, its redis-server's folder) there.
    const child = spawn(binary, ['demo', '--port', '0', ...args], {
      env: { ...process.env, TMPDIR: dir },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const demo = new Demo(child);
    demo.base = await until('the demo printing its URL', () => {
      assert.ok(!exited(child), `the demo exited (${child.exitCode ?? child.signalCode}):\n${demo.output}`);
      return /^open (http:\/\/127\.0\.0\.1:\d+\/)/m.exec(demo.output)?.[1];
    }, 20_000);
    return demo;
  }

  constructor(child) {
    this.child = child;
    this.output = '';
    child.stdout.setEncoding('utf8').on('data', (text) => (this.output += text));
    child.stderr.setEncoding('utf8').on('data', (text) => (this.output += text));
  }

  /** Ctrl-C, as a user would stop it: it stops its replicas and removes its folder. */
  async stop() {
    await stopChild(this.child, 'SIGINT');
  }

  /** The user's jobs as the app's `GET /api/jobs` answers (what the page loads on every reset). */
  async jobs(user) {
    const answer = await fetch(`${this.base}api/jobs?user=${encodeURIComponent(user)}`);
    assert.equal(answer.status, 200, `GET /api/jobs: ${answer.status}`);
    return (await answer.json()).jobs;
  }
}

let browser;
const scratch = mkdtempSync(join(tmpdir(), 'herald-bff-browser-'));

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing (apt-get install chromium; scripts/test does)`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
});

after(async () => {
  await browser?.close();
  rmSync(scratch, { recursive: true, force: true });
});

/** A folder of this test's own under the scratch folder. */
function folder(name) {
  return mkdtempSync(join(scratch, `${name}-`));
}

/** Starts the demo with `args`, stopped (and its output shown on failure) when `t` ends. */
async function demoFor(t, args, dir) {
  const demo = await Demo.start(args, dir);
  t.defer(async () => {
    await demo.stop();
    if (t.failed || process.env.TEST_BFF_VERBOSE) console.log(`--- the demo's output\n${demo.output}`);
  });
  return demo;
}

/** The page for `user` in a browser context of its own, once its stream is open and its first load landed. */
async function openPage(t, demo, user) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (error) => problems.push(String(error)));
  t.defer(async () => {
    if (t.failed || process.env.TEST_BFF_VERBOSE) {
      console.log(`--- the page's log\n${await page.locator('#log').textContent().catch((e) => String(e))}`);
    }
    await context.close();
    assert.deepEqual(problems, [], 'no uncaught error in the page');
  });
  await page.goto(`${demo.base}?user=${user}`);
  await waitForLoad(page, 'subscribed');
  return page;
}

const wait = (page, condition, arg) => page.waitForFunction(condition, arg, { timeout: DEADLINE_MS, polling: 25 });

/** Waits until the stream is open and the page logged `count` loads from the database for `cause`. */
async function waitForLoad(page, cause, count = 1) {
  await wait(
    page,
    ([cause, count]) => {
      const line = new RegExp(`^\\S+ loaded \\d+ jobs from the database through replica-\\d+ \\(${cause}\\)$`, 'gm');
      const loads = document.getElementById('log').textContent.match(line) ?? [];
      return /^open on replica-\d+$/.test(document.getElementById('state').textContent) && loads.length >= count;
    },
    [cause, count],
  );
}

/** The replica holding the page's stream, as the page says ("open on replica-2"). */
async function streamNode(page) {
  return (await page.locator('#state').textContent()).replace(/^open on /, '');
}

/** The page's table: one entry per row, as shown. */
function rows(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('#jobs tr')].map((tr) => {
      const [id, status, result, startedBy, finishedBy] = [...tr.children];
      return {
        id: id.textContent,
        status: status.className,
        statusText: status.textContent,
        result: result.textContent,
        started_by: startedBy.textContent,
        finished_by: finishedBy.textContent,
        stale: tr.classList.contains('stale'),
      };
    }),
  );
}

/** Waits until the table has `n` rows and every one says `done`. */
async function waitAllDone(page, n) {
  await wait(
    page,
    (n) => {
      const cells = [...document.querySelectorAll('#jobs tr td:nth-child(2)')];
      return cells.length === n && cells.every((td) => td.className === 'done' && td.textContent === 'done');
    },
    n,
  );
}

/** Waits until the table has `n` rows (the clicks' requests answered). */
async function waitRows(page, n) {
  await wait(page, (n) => document.querySelectorAll('#jobs tr').length === n, n);
}

/** The page's rows, field for field, as the app's jobs would show (for a deepEqual with GET /api/jobs). */
function shown(list) {
  return Object.fromEntries(
    list.map((row) => [
      row.id,
      { status: row.status, result: row.result, started_by: row.started_by, finished_by: row.finished_by },
    ]),
  );
}
function stored(list) {
  return Object.fromEntries(
    list.map((job) => [
      job.id,
      { status: job.status, result: job.result ?? '', started_by: job.started_by, finished_by: job.finished_by ?? '' },
    ]),
  );
}

/**
 * A test whose `t.failed` is set when its body fails (its clean-ups then show the demo's output and the
 * page's log). `t.defer(fn)` queues a clean-up, run last-in first-out after the body: the page, then the
 * demo, then Redis.
 */
function scenario(name, body) {
  test(name, async (t) => {
    const cleanups = [];
    t.defer = (fn) => cleanups.push(fn);
    t.after(async () => {
      const problems = [];
      for (const fn of cleanups.reverse()) await fn().catch((error) => problems.push(error));
      if (problems.length) throw problems[0];
    });
    try {
      await body(t);
    } catch (error) {
      t.failed = true;
      throw error;
    }
  });
}

/** A user name of this run's own (the page takes it from `?user=`). */
const userNamed = (name) => `${name}-${Math.random().toString(36).slice(2, 8)}`;

scenario('with Redis, every job the user starts turns done on the page, as in the database', async (t) => {
  const dir = folder('redis');
  const redis = await Redis.start();
  t.defer(() => redis.stop());
  const demo = await demoFor(t, ['--redis', redis.url], dir);
  const user = userNamed('alice');
  const page = await openPage(t, demo, user);
  const node = await streamNode(page);

  await page.click('#ten');
  await page.click('#one');
  await page.click('#one');
  await waitRows(page, 12);
  await waitAllDone(page, 12);

  const jobs = await demo.jobs(user);
  assert.equal(jobs.length, 12);
  assert.ok(jobs.every((job) => job.status === 'done'));
  assert.deepEqual(shown(await rows(page)), stored(jobs), 'the page shows what the database holds');
  assert.equal(await page.locator('#summary').textContent(), '12 jobs, 0 pending on this page');
  // The point: results published on replicas other than the stream's reached the page too.
  const elsewhere = jobs.filter((job) => job.finished_by !== node).length;
  assert.ok(elsewhere > 0, `every webhook landed on the stream's replica ${node}: the test proves nothing`);

  await page.click('#compare');
  await wait(page, () => document.getElementById('summary').textContent.endsWith('; the database agrees'));
  assert.equal((await rows(page)).filter((row) => row.stale).length, 0);
  const log = await page.locator('#log').textContent();
  assert.doesNotMatch(log, /reset \(/, 'no reset on a healthy cluster');
  console.log(`redis: 12 jobs done on the page, ${elsewhere} finished on replicas other than the stream's ${node}`);
});

scenario('naive, the page misses the results published on other replicas until it compares or reloads', async (t) => {
  const dir = folder('naive');
  const demo = await demoFor(t, ['--naive'], dir);
  const user = userNamed('bob');
  const page = await openPage(t, demo, user);
  const node = await streamNode(page);

  await page.click('#ten');
  for (let i = 0; i < 5; i++) await page.click('#one');
  await waitRows(page, 15);

  // Every webhook was saved: the database has all 15 done …
  const jobs = await until('every job done in GET /api/jobs', async () => {
    const jobs = await demo.jobs(user);
    return jobs.length === 15 && jobs.every((job) => job.status === 'done') && jobs;
  });
  // … but only the results that landed on the stream's replica reach the page (each is published just
  // after it is saved, so wait for those).
  const reachable = jobs.filter((job) => job.finished_by === node).map((job) => job.id).sort();
  const missed = jobs.filter((job) => job.finished_by !== node);
  await wait(
    page,
    (reachable) =>
      [...document.querySelectorAll('#jobs tr')]
        .filter((tr) => tr.children[1].className === 'done')
        .map((tr) => tr.children[0].textContent)
        .sort()
        .join() === reachable.join(),
    reachable,
  );
  // With webhooks spread at random over three replicas, none missing has odds of 3^-15.
  assert.ok(missed.length >= 1, `every webhook landed on the stream's replica ${node}`);
  const before = await rows(page);
  assert.deepEqual(
    before.filter((row) => row.status === 'pending').map((row) => row.id).sort(),
    missed.map((job) => job.id).sort(),
    'the jobs finished elsewhere are still pending on the page',
  );
  assert.equal(await page.locator('#summary').textContent(), `15 jobs, ${missed.length} pending on this page`);
  assert.doesNotMatch(await page.locator('#log').textContent(), /reset \(/, 'nothing told the page');

  // "Compare with the database" reveals them: red rows, "pending (database: done on replica-N)".
  await page.click('#compare');
  await wait(page, () => document.querySelectorAll('#jobs tr.stale').length > 0);
  const compared = await rows(page);
  assert.deepEqual(
    compared.filter((row) => row.stale).map((row) => [row.id, row.statusText]).sort(),
    missed.map((job) => [job.id, `pending (database: done on ${job.finished_by})`]).sort(),
  );
  assert.equal(
    await page.locator('#summary').textContent(),
    `15 jobs, ${missed.length} pending on this page; ${missed.length} of them are done in the database: ` +
      'their updates never reached this page',
  );

  // A reload fetches from the database: every job done.
  await page.reload();
  await waitForLoad(page, 'subscribed');
  await waitAllDone(page, 15);
  assert.deepEqual(shown(await rows(page)), stored(await demo.jobs(user)));
  console.log(`naive: ${missed.length} of 15 results never reached the stream on ${node}; the reload shows all done`);
});

scenario('Redis restarted empty mid-run: the page gets a reset, re-fetches, and shows every job done', async (t) => {
  const dir = folder('restart');
  const redis = await Redis.start();
  t.defer(() => redis.stop());
  const demo = await demoFor(t, ['--redis', redis.url], dir);
  const user = userNamed('carol');
  const page = await openPage(t, demo, user);

  for (let i = 0; i < 3; i++) await page.click('#one');
  await waitRows(page, 3);
  await waitAllDone(page, 3);
  const firstIds = (await rows(page)).map((row) => row.id);

  // Redis goes away; jobs started now finish meanwhile: their webhooks save the result, but nothing
  // can be published (503, the external system retries).
  await redis.kill();
  for (let i = 0; i < 3; i++) await page.click('#one');
  await waitRows(page, 6);
  const later = (await demo.jobs(user)).map((job) => job.id).filter((id) => !firstIds.includes(id));
  assert.equal(later.length, 3);
  await until('a job started while Redis is away saved as done', async () =>
    (await demo.jobs(user)).some((job) => later.includes(job.id) && job.status === 'done'),
  );
  const logBefore = await page.locator('#log').textContent();
  assert.doesNotMatch(logBefore, /reset \(/, 'no reset before Redis is back');

  // Redis comes back with nothing in it: positions, history and idempotency keys are gone.
  await redis.spawn();
  await waitForLoad(page, 'reset');
  const log = await page.locator('#log').textContent();
  const reason = /reset \((\w+)\)/.exec(log)?.[1];
  assert.ok(['epoch_changed', 'history_gone', 'gap'].includes(reason), `reset reason ${reason}`);
  await waitAllDone(page, 6);
  const jobs = await until('every job done in GET /api/jobs', async () => {
    const jobs = await demo.jobs(user);
    return jobs.length === 6 && jobs.every((job) => job.status === 'done') && jobs;
  });
  assert.deepEqual(shown(await rows(page)), stored(jobs), 'after the reset the page shows what the database holds');
  console.log(`restart: the page was reset (${reason}), re-fetched, and shows all 6 jobs done`);
});
