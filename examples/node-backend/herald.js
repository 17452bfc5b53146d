// Publishing to a Herald cluster from a backend, with nothing but Node's built-in fetch.
//
// What matters when a backend publishes:
//   - Any node will do: every node of a cluster accepts publishes for every channel. Give the publisher
//     several node URLs (or one balancer URL); it sticks to the node that last answered and moves to the
//     next one when a node fails.
//   - Every publish carries an idempotency key derived from the business event ("order-8f3a-paid"), and
//     every retry sends the same key. A retry after an answer that never came (the node died, the network
//     cut the connection) may find the first attempt already published: Herald then answers the first
//     publication's position with `duplicate: true` and publishes nothing, so subscribers see it once.
//   - Retry only what can succeed later: 503 (the engine is unreachable from that node, or the write was
//     not replicated as `redis.durability` requires), 429 (a rate limit) and network failures (a node that
//     is down or draining refuses connections). Any other 4xx is a bug in the request: thrown at once.
//   - Pass a correlation ID (X-Correlation-ID): it ends up in the envelope subscribers get and in Herald's
//     logs, so one ID follows the change from the HTTP call that caused it to the browser.

/** A publish Herald refused for good, or the last failure once every attempt was used. */
export class PublishError extends Error {
  constructor(message, { status = null, code = null, tries = [] } = {}) {
    super(message);
    this.name = 'PublishError';
    this.status = status;
    this.code = code;
    this.tries = tries;
  }
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

export class HeraldPublisher {
  /**
   * @param {object} options
   * @param {string[]} options.urls Herald node base URLs, e.g. ['http://10.0.0.5:8080', 'http://10.0.0.6:8080'].
   * @param {string} [options.apiKey] One of the cluster's `api_keys` (sent as `Authorization: Bearer`).
   * @param {number} [options.attempts] Most attempts per publication, across all nodes.
   * @param {number} [options.requestTimeoutMs] Longest wait for one node's answer.
   */
  constructor({ urls, apiKey, attempts = 6, requestTimeoutMs = 3000 }) {
    if (!Array.isArray(urls) || urls.length === 0) throw new Error('HeraldPublisher needs at least one node URL');
    this.urls = urls.map((url) => url.replace(/\/+$/, ''));
    this.apiKey = apiKey;
    this.attempts = attempts;
    this.requestTimeoutMs = requestTimeoutMs;
    /** Index of the node to try first: the one that answered last. */
    this.preferred = 0;
  }

  /**
   * Publishes one publication, retrying on other nodes with the same idempotency key.
   * Resolves to `{ node, answer, tries }`: the node that answered, Herald's answer (`channel`, `epoch`,
   * `offset`, `duplicate`, `correlation_id`) and what each attempt got.
   */
  async publish({ channel, event, data, idempotencyKey, correlationId }) {
    const body = JSON.stringify({ channel, event, data, idempotency_key: idempotencyKey });
    const headers = { 'content-type': 'application/json' };
    if (this.apiKey) headers.authorization = `Bearer ${this.apiKey}`;
    if (correlationId) headers['x-correlation-id'] = correlationId;
    const tries = [];
    let waitMs = 0;
    for (let attempt = 0; attempt < this.attempts; attempt++) {
      const index = (this.preferred + attempt) % this.urls.length;
      const node = this.urls[index];
      // Another node is tried at once; a wait comes only once every node has failed in this round.
      if (attempt > 0 && attempt % this.urls.length === 0) {
        const backoff = Math.min(2000, 100 * 2 ** (attempt / this.urls.length));
        await sleep(Math.max(waitMs, backoff * (0.5 + Math.random() / 2)));
        waitMs = 0;
      }
      let response;
      try {
        response = await fetch(`${node}/v1/publish`, {
          method: 'POST',
          headers,
          body,
          signal: AbortSignal.timeout(this.requestTimeoutMs),
        });
      } catch (error) {
        // No answer: the node is down, the connection was cut, or it took too long. The publication may
        // or may not have been made; the retry's idempotency key settles which.
        tries.push({ node, outcome: describe(error) });
        continue;
      }
      const answer = await response.json().catch(() => null);
      const code = answer?.error?.code ?? null;
      tries.push({ node, outcome: response.ok ? String(response.status) : `${response.status} ${code}` });
      if (response.ok) {
        this.preferred = index;
        return { node, answer, tries };
      }
      if (response.status === 503 || response.status === 429) {
        const retryAfter = Number(response.headers.get('retry-after'));
        if (Number.isFinite(retryAfter)) waitMs = Math.max(waitMs, retryAfter * 1000);
        continue;
      }
      throw new PublishError(`Herald refused the publication: ${response.status} ${code}: ${answer?.error?.message}`, {
        status: response.status,
        code,
        tries,
      });
    }
    throw new PublishError(`no Herald node published after ${tries.length} attempts`, { tries });
  }
}

function describe(error) {
  const cause = error?.cause;
  return cause?.code ?? cause?.name ?? error?.name ?? 'error';
}
