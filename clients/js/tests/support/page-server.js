// The web server the browser tests load their pages from: it serves the built client, a test page and
// Herald's demo page, plays the application backend (tokens, authoritative state), and forwards
// everything else (`/v1/…` requests, SSE streams, WebSocket upgrades) to one of the Herald nodes, as a
// load balancer in front of a cluster would. The page so has one origin, and a node that dies behind it
// is replaced by another on the client's next connection, as in a deployment.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { repo, signToken } from './processes.js';

const CLIENT = join(repo, 'clients/js/dist/herald-client.js');
const DEMO = join(repo, 'crates/herald-server/static/index.html');
const TEST_PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>herald-client test</title></head><body>
<script type="module">
import * as herald from '/herald-client.js';
// What each test's handlers saw, read by the test through the DevTools protocol.
const rec = { messages: [], resets: [], states: [], errors: [], subscribed: [], snapshots: [], fetches: 0, tokens: 0 };
window.rec = rec;
window.herald = herald;
window.recorder = (tag = '') => ({
  onMessage: (m) => rec.messages.push({ tag, channel: m.channel, epoch: m.epoch, offset: m.offset, data: m.data }),
  onReset: (channel, position, reason) => rec.resets.push({ tag, channel, position, reason }),
  onState: (state, info) => rec.states.push({ tag, state, node: info.node, error: info.error && info.error.code, at: Date.now() }),
  onSubscribed: (channel, position) => rec.subscribed.push({ tag, channel, position }),
  onError: (e) => rec.errors.push({ tag, code: e.code, channel: e.channel, fatal: e.fatal, message: e.message }),
});
// getToken as an application writes it: ask its own backend.
window.tokenFrom = (query) => async () => {
  rec.tokens++;
  const answer = await fetch('/token?' + query);
  return (await answer.json()).token;
};
window.ready = true;
</script></body></html>`;

export class PageServer {
  /** `upstreams()` lists the Herald base URLs to forward to (it is asked on every request). */
  static async start(upstreams) {
    const server = new PageServer(upstreams);
    await new Promise((done) => server.http.listen(0, '127.0.0.1', done));
    server.port = server.http.address().port;
    return server;
  }

  constructor(upstreams) {
    this.upstreams = upstreams;
    this.turn = 0;
    this.states = new Map();
    this.sockets = new Set();
    /** Forwarded long-lived connections: { kind: 'sse' | 'ws', upstream, open }. */
    this.streams = [];
    this.http = http.createServer((req, res) => this.route(req, res));
    this.http.on('upgrade', (req, socket, head) => this.upgrade(req, socket, head));
    this.http.on('connection', (socket) => {
      this.sockets.add(socket);
      socket.once('close', () => this.sockets.delete(socket));
    });
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The authoritative state of `channel`, as the application backend holds it. */
  state(channel) {
    let state = this.states.get(channel);
    if (!state) {
      state = { items: [], position: null };
      this.states.set(channel, state);
    }
    return state;
  }

  /** Publishes through `node` and records it in the backend's state once Herald answered. */
  async publish(node, channel, item) {
    const answer = await node.publish(channel, { item });
    const state = this.state(channel);
    state.items.push(item);
    state.position = { epoch: answer.epoch, offset: answer.offset };
    return answer;
  }

  route(req, res) {
    const url = new URL(req.url, this.base);
    const send = (status, type, body) => {
      res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(body);
    };
    switch (url.pathname) {
      case '/test.html':
        return send(200, 'text/html; charset=utf-8', TEST_PAGE);
      case '/':
        return send(200, 'text/html; charset=utf-8', readFileSync(DEMO));
      case '/herald-client.js':
        return send(200, 'text/javascript; charset=utf-8', readFileSync(CLIENT));
      case '/token': {
        const ttl = Number(url.searchParams.get('ttl') ?? 600);
        const channels = url.searchParams.getAll('channel');
        const token = signToken({ sub: url.searchParams.get('sub') ?? 'tester', ttl, channels: channels.length ? channels : undefined });
        return send(200, 'application/json', JSON.stringify({ token }));
      }
      case '/state': {
        const state = this.state(url.searchParams.get('channel'));
        // A copy as of now: later publications must reach the page through Herald.
        return send(200, 'application/json', JSON.stringify({ items: [...state.items], position: state.position }));
      }
      default:
        return this.forward(req, res);
    }
  }

  /** The upstream for the next connection, round robin over those that accept a TCP connection. */
  async pick() {
    const list = this.upstreams();
    for (let tried = 0; tried < list.length; tried++) {
      const base = new URL(list[this.turn++ % list.length]);
      const ok = await new Promise((done) => {
        const probe = net.connect({ host: base.hostname, port: Number(base.port) }, () => {
          probe.destroy();
          done(true);
        });
        probe.once('error', () => done(false));
      });
      if (ok) return base;
    }
    return null;
  }

  async forward(req, res) {
    const upstream = await this.pick();
    if (!upstream) {
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'bad_gateway', message: 'no Herald node answers' } }));
      return;
    }
    const isSse = req.url.startsWith('/v1/sse');
    const stream = { kind: 'sse', upstream: upstream.toString(), open: true };
    if (isSse) this.streams.push(stream);
    const out = http.request(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers, agent: false },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
        // A node that dies mid-stream: cut the browser's stream too, as a balancer would.
        answer.once('error', () => res.destroy());
        answer.socket.once('close', () => {
          stream.open = false;
          if (!answer.complete) res.destroy();
        });
      },
    );
    out.once('error', () => {
      stream.open = false;
      if (!res.headersSent) {
        res.writeHead(502, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ error: { code: 'bad_gateway', message: 'the node went away' } }));
      } else res.destroy();
    });
    res.once('close', () => out.destroy());
    req.pipe(out);
  }

  async upgrade(req, socket, head) {
    const upstream = await this.pick();
    if (!upstream) {
      socket.end('HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n');
      return;
    }
    const stream = { kind: 'ws', upstream: upstream.toString(), open: true };
    this.streams.push(stream);
    const out = net.connect({ host: upstream.hostname, port: Number(upstream.port) }, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      out.write(lines.join('\r\n') + '\r\n\r\n');
      if (head && head.length) out.write(head);
      out.pipe(socket);
      socket.pipe(out);
    });
    const end = () => {
      stream.open = false;
      out.destroy();
      socket.destroy();
    };
    out.once('error', end);
    out.once('close', end);
    socket.once('error', end);
    socket.once('close', end);
  }

  async stop() {
    for (const socket of this.sockets) socket.destroy();
    await new Promise((done) => this.http.close(done));
  }
}
