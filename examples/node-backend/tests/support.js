// Processes and tools for the example's end-to-end test: a redis-server, Herald nodes and the orders
// service of the test's own, on free loopback ports, stopped by PID (killed if the test process exits
// first); a TCP relay that can cut or sabotage a connection; an SSE reader. Nothing here touches a Redis
// or NATS the machine runs for itself (6379, 4222).

import { spawn } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import {
  DEADLINE_MS,
  Redis,
  freePort,
  heraldBinary,
  stopChild,
  track,
  until,
} from '../../../clients/js/tests/support/processes.js';

export { DEADLINE_MS, Redis, freePort, stopChild, until };

const here = dirname(fileURLToPath(import.meta.url));
export const example = resolve(here, '..');
/** The API key the test's Herald nodes accept and the service sends. */
export const API_KEY = 'node-backend-example-test-key-0123456789';

/** Resolves with the first line of `child`'s stdout that matches `pattern` (its match). */
function firstLine(child, pattern, what, stderr) {
  return new Promise((done, fail) => {
    let out = '';
    const onData = (chunk) => {
      out += chunk;
      const match = pattern.exec(out);
      if (match) {
        child.stdout.off('data', onData);
        child.stdout.resume();
        child.off('exit', onExit);
        done(match);
      }
    };
    const onExit = (code, signal) => fail(new Error(`${what} exited (${code ?? signal}) before listening:\n${stderr()}`));
    child.stdout.on('data', onData);
    child.once('exit', onExit);
  });
}

/** One Herald node on a free port, with the test's API key, on `engine`. */
export class Herald {
  static async start({ name, engine }) {
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME ?? '/tmp',
      HERALD_API_KEYS: API_KEY,
      HERALD_REDIS__PROBE_INTERVAL_MS: '200',
      HERALD_REDIS__PROBE_TIMEOUT_MS: '1000',
      HERALD_REDIS__COMMAND_TIMEOUT_MS: '500',
      HERALD_DRAIN_WINDOW_MS: '200',
      HERALD_SHUTDOWN_GRACE_SECS: '2',
      HERALD_LOG: 'warn',
    };
    const args = ['--listen', '127.0.0.1:0', '--engine', engine, '--node-id', name];
    const child = track(spawn(heraldBinary(), args, { env, stdio: ['ignore', 'pipe', 'pipe'] }));
    const node = new Herald(name, child);
    child.stderr.on('data', (chunk) => {
      node.stderr = (node.stderr + chunk).slice(-8000);
    });
    const match = await firstLine(child, /"listening":"127\.0\.0\.1:(\d+)"/, `herald ${name}`, () => node.stderr);
    node.port = Number(match[1]);
    await until(`${name} ready`, async () => (await fetch(`${node.base}/readyz`)).ok);
    return node;
  }

  constructor(name, child) {
    this.name = name;
    this.child = child;
    this.port = 0;
    this.stderr = '';
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Publishes directly (as another backend would); returns Herald's answer. */
  async publish(channel, data, event = 'marker') {
    const response = await fetch(`${this.base}/v1/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
      body: JSON.stringify({ channel, data, event }),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(`publish ${response.status}: ${JSON.stringify(answer)}`);
    return answer;
  }

  async kill() {
    await stopChild(this.child, 'SIGKILL');
  }

  async stop() {
    await stopChild(this.child, 'SIGTERM', 3000);
  }
}

/** The example service (server.js) as its own process, configured through its environment. */
export class Service {
  static async start({ heraldUrls }) {
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME ?? '/tmp',
      ORDERS_LISTEN: '127.0.0.1:0',
      ORDERS_HERALD_URLS: heraldUrls.join(','),
      ORDERS_HERALD_API_KEY: API_KEY,
    };
    const child = track(spawn(process.execPath, [join(example, 'server.js')], { env, stdio: ['ignore', 'pipe', 'pipe'] }));
    const service = new Service(child);
    child.stderr.on('data', (chunk) => {
      service.stderr = (service.stderr + chunk).slice(-8000);
    });
    const match = await firstLine(child, /"listening":"127\.0\.0\.1:(\d+)"/, 'the service', () => service.stderr);
    service.port = Number(match[1]);
    return service;
  }

  constructor(child) {
    this.child = child;
    this.port = 0;
    this.stderr = '';
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** `POST /orders/:id/pay`; resolves to `{ status, body, correlationId }`. */
  async pay(id, details, correlationId) {
    const headers = { 'content-type': 'application/json' };
    if (correlationId) headers['x-correlation-id'] = correlationId;
    const response = await fetch(`${this.base}/orders/${id}/pay`, {
      method: 'POST',
      headers,
      body: JSON.stringify(details),
      signal: AbortSignal.timeout(DEADLINE_MS),
    });
    return { status: response.status, body: await response.json(), correlationId: response.headers.get('x-correlation-id') };
  }

  async stop() {
    await stopChild(this.child);
  }
}

/**
 * A loopback TCP relay to `port`. With `onAnswer(received, client)`, what the upstream sends is not
 * relayed: it is collected, and `onAnswer` is called with all of it so far after each chunk, so the test
 * decides what becomes of the client (here: its connection is cut once the answer is complete). `cut()`
 * closes every relayed connection and refuses new ones.
 */
export class Relay {
  static async start(port, { onAnswer } = {}) {
    const relay = new Relay(port, onAnswer);
    await new Promise((done) => relay.server.listen(0, '127.0.0.1', done));
    relay.port = relay.server.address().port;
    return relay;
  }

  constructor(upstreamPort, onAnswer) {
    this.upstreamPort = upstreamPort;
    this.onAnswer = onAnswer;
    this.open = true;
    this.sockets = new Set();
    this.server = net.createServer((client) => this.relay(client));
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  relay(client) {
    if (!this.open) {
      client.destroy();
      return;
    }
    const upstream = net.connect({ host: '127.0.0.1', port: this.upstreamPort });
    for (const socket of [client, upstream]) {
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
      socket.on('error', () => {});
    }
    client.pipe(upstream);
    let received = '';
    upstream.on('data', (chunk) => {
      if (!this.onAnswer) {
        client.write(chunk);
        return;
      }
      received += chunk.toString('latin1');
      this.onAnswer(received, client);
    });
    upstream.once('close', () => client.destroy());
    client.once('close', () => upstream.destroy());
  }

  cut() {
    this.open = false;
    for (const socket of this.sockets) socket.destroy();
  }

  async stop() {
    this.cut();
    await new Promise((done) => this.server.close(done));
  }
}

/** An SSE subscriber (node:http, so that closing it closes its socket): `next()` is the next event. */
export class SseReader {
  static open(url) {
    return new Promise((done, fail) => {
      const request = http.get(url, { headers: { accept: 'text/event-stream' }, agent: false }, (response) => {
        if (response.statusCode !== 200) {
          let text = '';
          response.on('data', (chunk) => (text += chunk));
          response.on('end', () => fail(new Error(`SSE ${url}: ${response.statusCode} ${text}`)));
          return;
        }
        done(new SseReader(request, response));
      });
      request.once('error', fail);
    });
  }

  constructor(request, response) {
    this.request = request;
    this.buffer = '';
    this.ended = false;
    /** Called when data arrives or the stream ends. */
    this.wake = null;
    response.setEncoding('utf8');
    response.on('data', (chunk) => {
      this.buffer += chunk;
      this.wake?.();
    });
    response.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
  }

  async next(ms = DEADLINE_MS) {
    const deadline = Date.now() + ms;
    for (;;) {
      const end = this.buffer.indexOf('\n\n');
      if (end >= 0) {
        const block = this.buffer.slice(0, end);
        this.buffer = this.buffer.slice(end + 2);
        const event = { id: null, event: 'message', data: null };
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith(':') || line.startsWith('retry:')) continue;
          const colon = line.indexOf(':');
          const field = line.slice(0, colon);
          const value = line.slice(colon + 1).replace(/^ /, '');
          if (field === 'data') data.push(value);
          else if (field === 'id') event.id = value;
          else if (field === 'event') event.event = value;
        }
        if (data.length === 0) continue;
        event.data = JSON.parse(data.join('\n'));
        return event;
      }
      if (this.ended) throw new Error('the SSE stream ended');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for an SSE event');
      await new Promise((done) => {
        const timer = setTimeout(done, left);
        this.wake = () => {
          clearTimeout(timer);
          this.wake = null;
          done();
        };
      });
    }
  }

  close() {
    this.request.destroy();
  }
}
