// Real processes for the integration tests: a redis-server and Herald nodes of the tests' own, on free
// loopback ports, stopped by PID (and killed if the test process exits first). Nothing here touches
// a Redis or NATS the machine runs for itself. The process helpers are shared with the example
// backends' tests (examples/node-backend/tests/support.js).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { appendFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, '../../../..');
/** Debian's Chromium, and the flags it needs here: headless as root, and no background connections (this
 * machine's closed network refuses them, many at a time). */
export const CHROMIUM = '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
/** How long any awaited condition may take before the test fails. */
export const DEADLINE_MS = 20_000;

/** The Herald binary: `TEST_HERALD_BIN`, else the debug build `cargo test` just made. */
export function heraldBinary() {
  if (process.env.TEST_HERALD_BIN) return resolve(process.env.TEST_HERALD_BIN);
  const target = process.env.CARGO_TARGET_DIR || 'target';
  const binary = join(isAbsolute(target) ? target : join(repo, target), 'debug', 'herald');
  if (!existsSync(binary)) {
    throw new Error(`no Herald binary at ${binary}: build it (cargo build -p herald-server) or set TEST_HERALD_BIN`);
  }
  return binary;
}

const children = new Set();
process.on('exit', () => {
  for (const child of children) {
    try {
      process.kill(child.pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
});

/** Registers `child` to be killed if the test process exits before stopping it. */
export function track(child) {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** Resolves once `child` has exited (at once if it has). */
export function exited(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => child.once('exit', () => done()));
}

/** Stops one child by its PID: `signal`, then SIGKILL if it is still there after `graceMs`. */
export async function stopChild(child, signal = 'SIGTERM', graceMs = 5000) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(child.pid, signal);
  } catch {
    return;
  }
  const timer = setTimeout(() => {
    try {
      process.kill(child.pid, 'SIGKILL');
    } catch {
      // Gone meanwhile.
    }
  }, graceMs);
  await exited(child);
  clearTimeout(timer);
}

/** A free TCP port on 127.0.0.1 (the kernel picks it; it is released at once for the caller). */
export function freePort() {
  return new Promise((done, fail) => {
    const server = net.createServer();
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

/** Waits until `check()` returns something truthy (polling), or throws after `ms`. */
export async function until(what, check, ms = DEADLINE_MS, everyMs = 25) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ''}`);
    await new Promise((tick) => setTimeout(tick, everyMs));
  }
}

function ping(port) {
  return new Promise((done) => {
    const socket = net.connect({ host: '127.0.0.1', port }, () => socket.write('PING\r\n'));
    socket.setTimeout(1000, () => socket.destroy());
    socket.once('data', (data) => {
      socket.destroy();
      done(data.toString().startsWith('+PONG'));
    });
    socket.once('error', () => done(false));
    socket.once('close', () => done(false));
  });
}

/** A redis-server without persistence, on a free port, in a scratch folder. */
export class Redis {
  static async start() {
    const redis = new Redis(await freePort(), mkdtempSync(join(tmpdir(), 'herald-js-redis-')));
    await redis.spawn();
    return redis;
  }

  constructor(port, dir) {
    this.port = port;
    this.dir = dir;
    this.child = null;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  async spawn() {
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
    args.push('--dir', this.dir, '--protected-mode', 'no');
    this.child = track(spawn('redis-server', args, { stdio: 'ignore' }));
    const child = this.child;
    await until(`redis-server on port ${this.port}`, async () => {
      if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
      return ping(this.port);
    });
  }

  /** Kills the server outright, as a crash would (its data is gone: no persistence). */
  async kill() {
    if (this.child) await stopChild(this.child, 'SIGKILL');
  }

  /** Kills the server and starts it again, empty, on the same port. */
  async restart() {
    await this.kill();
    await this.spawn();
  }

  async stop() {
    if (this.child) await stopChild(this.child);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** The HS256 secret the tests' Herald nodes check client tokens with. */
export const JWT_SECRET = 'herald-js-client-tests-secret-0123456789abcdef';

/** Signs an HS256 JWT with `claims` (`exp` in seconds from now with `ttl`). */
export function signToken({ sub, ttl = 600, channels } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, iat: now, exp: now + ttl };
  if (channels) claims.channels = channels;
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${encode({ alg: 'HS256', typ: 'JWT' })}.${encode(claims)}`;
  const signature = createHmac('sha256', JWT_SECRET).update(body).digest('base64url');
  return `${body}.${signature}`;
}

let nodeCount = 0;

/**
 * One Herald node on a free port, on the given engine, with client tokens checked (HS256). Its log
 * level is `warn` unless `TEST_HERALD_LOG` says otherwise (a `HERALD_LOG` filter, for example
 * `herald_server=debug,herald_core=debug`); with `TEST_HERALD_LOG_DIR` each node's log also goes to
 * `<dir>/<node name>.log`, to read after a failure.
 */
export class Herald {
  static async start({ engine, env = {}, name } = {}) {
    const node = new Herald(engine, env, name ?? `node-js${++nodeCount}`);
    await node.spawn();
    return node;
  }

  constructor(engine, env, name) {
    this.engine = engine;
    this.env = env;
    this.name = name;
    this.child = null;
    this.port = 0;
    this.stderr = '';
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  async spawn() {
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME ?? '/tmp',
      HERALD_JWT_HS256_SECRET: JWT_SECRET,
      HERALD_SSE__RETRY_MS: '200',
      HERALD_DRAIN_WINDOW_MS: '300',
      HERALD_SHUTDOWN_GRACE_SECS: '2',
      HERALD_REDIS__PROBE_INTERVAL_MS: '200',
      HERALD_REDIS__PROBE_TIMEOUT_MS: '1000',
      HERALD_NAMESPACES__USER__SUBSCRIBE: 'public',
      HERALD_LOG: process.env.TEST_HERALD_LOG || 'warn',
      ...this.env,
    };
    const args = ['--listen', '127.0.0.1:0', '--engine', this.engine, '--node-id', this.name];
    const child = track(spawn(heraldBinary(), args, { env, stdio: ['ignore', 'pipe', 'pipe'] }));
    this.child = child;
    const logFile = process.env.TEST_HERALD_LOG_DIR && join(process.env.TEST_HERALD_LOG_DIR, `${this.name}.log`);
    child.stderr.on('data', (chunk) => {
      this.stderr = (this.stderr + chunk).slice(-8000);
      if (logFile) appendFileSync(logFile, chunk);
    });
    this.port = await new Promise((done, fail) => {
      let out = '';
      const onData = (chunk) => {
        out += chunk;
        const match = /"listening":"127\.0\.0\.1:(\d+)"/.exec(out);
        if (match) {
          child.stdout.off('data', onData);
          child.stdout.resume();
          done(Number(match[1]));
        }
      };
      child.stdout.on('data', onData);
      child.once('exit', (code) => fail(new Error(`herald exited with ${code} before listening:\n${this.stderr}`)));
    });
    await until(`${this.name} ready`, async () => (await fetch(`${this.base}/readyz`)).ok);
  }

  /** Publishes one publication; returns Herald's answer (throws on anything but 200). */
  async publish(channel, data, event) {
    const body = { channel, data };
    if (event) body.event = event;
    const response = await fetch(`${this.base}/v1/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(`publish ${response.status}: ${JSON.stringify(answer)}`);
    return answer;
  }

  async get(path) {
    const response = await fetch(`${this.base}${path}`);
    return { status: response.status, body: await response.json() };
  }

  /** SIGKILL: the node dies without draining. */
  async kill() {
    await stopChild(this.child, 'SIGKILL');
  }

  async stop() {
    if (this.child) await stopChild(this.child, 'SIGTERM', 3000);
  }
}
