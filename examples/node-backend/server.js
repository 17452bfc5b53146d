// An orders service that tells browsers about payments through Herald.
//
//   POST /orders/:id/pay   {"user":"42","amount":1999}   marks the order paid, then publishes
//                          `order.paid` to the channel `user:<user>` through any Herald node
//   GET  /orders/:id       the order as this service holds it (what a browser reloads after a reset)
//   GET  /healthz
//
// The order's state is the source of truth and is saved first; the publication only tells subscribers
// that it changed. Its idempotency key is derived from the change itself (`order-<id>-paid`), so every
// retry, by the publisher or by a caller repeating the whole request, publishes at most once.
//
// Configuration (environment):
//   ORDERS_LISTEN          host:port to listen on (default 127.0.0.1:3000; port 0 picks a free one)
//   ORDERS_HERALD_URLS     comma-separated Herald node URLs (default http://127.0.0.1:8080)
//   ORDERS_HERALD_API_KEY  one of the cluster's API keys (HERALD_API_KEYS on the nodes)
//
// Run: node server.js  (Node 20 or later; no packages needed)

import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { pathToFileURL } from 'node:url';
import { HeraldPublisher, PublishError } from './herald.js';

const MAX_BODY_BYTES = 64 * 1024;
/** Order and user IDs end up in Herald channel names (`user:<id>`), so they keep to its characters. */
const ID = /^[A-Za-z0-9_-]{1,64}$/;
/** What Herald accepts as a correlation ID: 1 to 128 printable ASCII characters, no `"` or `\`. */
const CORRELATION_ID = /^[!#-[\]-~]{1,128}$/;

class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The service as an `http.Server` (not yet listening). */
export function createService({ publisher }) {
  /** order id -> { id, user, amount, status, paid_at } */
  const orders = new Map();

  async function pay(id, request, correlationId) {
    const input = await readJson(request);
    const user = input?.user;
    const amount = input?.amount;
    if (typeof user !== 'string' || !ID.test(user)) throw new HttpError(400, 'bad_user', 'user must be 1 to 64 of A-Z a-z 0-9 _ -');
    if (!Number.isInteger(amount) || amount < 0) throw new HttpError(400, 'bad_amount', 'amount must be a non-negative integer');
    let order = orders.get(id);
    if (order && (order.user !== user || order.amount !== amount)) {
      throw new HttpError(409, 'conflict', `order ${id} was already paid with other details`);
    }
    if (!order) {
      // The state change comes first and stands whatever happens to the publication.
      order = { id, user, amount, status: 'paid', paid_at: new Date().toISOString() };
      orders.set(id, order);
    }
    // Published again when the order was already paid: a caller repeating the request may be retrying a
    // publication that failed last time. The same key makes Herald answer `duplicate` if it did not.
    const { node, answer, tries } = await publisher.publish({
      channel: `user:${user}`,
      event: 'order.paid',
      data: { order: id, status: order.status, amount: order.amount, paid_at: order.paid_at },
      idempotencyKey: `order-${id}-paid`,
      correlationId,
    });
    return {
      order,
      published: { node, epoch: answer.epoch, offset: answer.offset, duplicate: answer.duplicate, tries },
    };
  }

  async function route(request, correlationId) {
    const url = new URL(request.url, 'http://service');
    const parts = url.pathname.split('/').filter(Boolean);
    if (request.method === 'GET' && url.pathname === '/healthz') return { status: 'ok' };
    if (parts[0] === 'orders' && parts.length >= 2 && !ID.test(parts[1])) {
      throw new HttpError(400, 'bad_order', 'order IDs are 1 to 64 of A-Z a-z 0-9 _ -');
    }
    if (request.method === 'POST' && parts.length === 3 && parts[0] === 'orders' && parts[2] === 'pay') {
      return pay(parts[1], request, correlationId);
    }
    if (request.method === 'GET' && parts.length === 2 && parts[0] === 'orders') {
      const order = orders.get(parts[1]);
      if (!order) throw new HttpError(404, 'not_found', `no order ${parts[1]}`);
      return { order };
    }
    throw new HttpError(404, 'not_found', 'no such route');
  }

  return http.createServer(async (request, response) => {
    // One ID for the whole story: the caller's, else a fresh one; Herald puts it in the envelope.
    const given = request.headers['x-correlation-id'];
    const correlationId = typeof given === 'string' && CORRELATION_ID.test(given) ? given : randomBytes(16).toString('hex');
    let status = 200;
    let body;
    try {
      body = await route(request, correlationId);
    } catch (error) {
      if (error instanceof HttpError) {
        status = error.status;
        body = { error: { code: error.code, message: error.message } };
      } else if (error instanceof PublishError) {
        // The order is saved; only the notification is missing. Subscribers still converge (they reload
        // the order after a reset or a reconnect), and calling again retries the publication.
        status = error.status && error.status < 500 ? 500 : 503;
        body = { error: { code: 'publish_failed', message: error.message, tries: error.tries } };
      } else {
        status = 500;
        body = { error: { code: 'internal', message: 'internal error' } };
        console.error(error);
      }
    }
    response.writeHead(status, { 'content-type': 'application/json', 'x-correlation-id': correlationId });
    response.end(JSON.stringify(body));
  });
}

function readJson(request) {
  return new Promise((resolve, reject) => {
    const type = request.headers['content-type'] ?? '';
    if (!/^application\/json\b/i.test(type)) {
      reject(new HttpError(415, 'unsupported_media_type', 'send Content-Type: application/json'));
      request.resume();
      return;
    }
    const chunks = [];
    let size = 0;
    request.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, 'body_too_large', `at most ${MAX_BODY_BYTES} bytes`));
        request.destroy();
        return;
      }
      chunks.push(chunk);
    });
    request.on('error', reject);
    request.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      } catch {
        reject(new HttpError(400, 'malformed_json', 'the body is not JSON'));
      }
    });
  });
}

/** Starts the service from the environment (see the top of this file). */
export async function main(env = process.env) {
  const [host, port] = splitListen(env.ORDERS_LISTEN ?? '127.0.0.1:3000');
  const publisher = new HeraldPublisher({
    urls: (env.ORDERS_HERALD_URLS ?? 'http://127.0.0.1:8080').split(',').map((u) => u.trim()).filter(Boolean),
    apiKey: env.ORDERS_HERALD_API_KEY || undefined,
  });
  const server = createService({ publisher });
  await new Promise((done, fail) => {
    server.once('error', fail);
    server.listen(port, host, done);
  });
  const address = server.address();
  // One JSON line on stdout, so that scripts (and the tests) learn the port when it was 0.
  console.log(JSON.stringify({ listening: `${address.address}:${address.port}`, herald: publisher.urls }));
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  return server;
}

function splitListen(listen) {
  const at = listen.lastIndexOf(':');
  const port = Number(listen.slice(at + 1));
  if (at < 0 || !Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`ORDERS_LISTEN must be host:port, not ${listen}`);
  return [listen.slice(0, at), port];
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((error) => {
    console.error(error.message);
    process.exit(1);
  });
}
