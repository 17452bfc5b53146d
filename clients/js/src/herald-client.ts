// herald-client: the browser client of Herald (docs/protocol.md is the contract it follows).
//
// `createClient(options).subscribe(channels, handlers)` delivers each channel's publications in order,
// once each, across reconnects (SSE `Last-Event-ID`, WebSocket `since`), and says `onReset` when some
// cannot be replayed; `reconcile(...)` builds the reload-and-catch-up pattern on top.

export { createClient, HeraldClient, isChannelName, DEFAULTS } from './client.js';
export { reconcile } from './reconcile.js';
export type { Snapshot, LoadCause, ReconcileOptions, ReconcileHandlers } from './reconcile.js';
export { comparePositions, isCovered, isPosition, PositionTracker } from './position.js';
export type { Verdict } from './position.js';
export { Backoff, backoffDelay, drainDelay } from './backoff.js';
export type { BackoffOptions } from './backoff.js';
export { sseUrl, wsUrl, resolveBase } from './urls.js';
export type { SseUrlOptions } from './urls.js';
export { tokenExpiry, TokenSource } from './token.js';
export { HeraldError } from './types.js';
export type {
  ClientOptions,
  ConnectionState,
  Handlers,
  Message,
  Position,
  ResetReason,
  StateInfo,
  Subscription,
  TokenProvider,
  Transport,
} from './types.js';
