// The URLs the client opens (docs/protocol.md "Server-Sent Events" and "WebSocket").

import type { Position } from './types.js';

/** Resolves a base URL against the page (a relative base needs one) and makes it end with `/`. */
export function resolveBase(base: string, page?: string): URL {
  const here = page ?? (typeof location !== 'undefined' ? location.href : undefined);
  const url = here === undefined ? new URL(base) : new URL(base || '/', here);
  if (!url.pathname.endsWith('/')) url.pathname += '/';
  url.search = '';
  url.hash = '';
  return url;
}

export interface SseUrlOptions {
  readonly token?: string | null;
  /** The last cursor received (sent as `last_event_id`: a new EventSource cannot set the header). */
  readonly lastEventId?: string | null;
  /** The page URL relative bases resolve against (default: the page's own). */
  readonly page?: string;
}

/** `…/v1/sse?channel=A&channel=B[&token=…][&last_event_id=…]` */
export function sseUrl(base: string, channels: readonly string[], options: SseUrlOptions = {}): string {
  const url = new URL('v1/sse', resolveBase(base, options.page));
  for (const channel of channels) url.searchParams.append('channel', channel);
  if (options.token) url.searchParams.set('token', options.token);
  if (options.lastEventId) url.searchParams.set('last_event_id', options.lastEventId);
  return url.toString();
}

/** `ws[s]://…/v1/ws[?token=…]` (the scheme follows the base's: http gives ws, https gives wss). */
export function wsUrl(base: string, options: { token?: string | null; page?: string } = {}): string {
  const url = new URL('v1/ws', resolveBase(base, options.page));
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  if (options.token) url.searchParams.set('token', options.token);
  return url.toString();
}

/** The WebSocket `subscribe` operation. */
export function subscribeFrame(id: number, channel: string, since?: Position | null): string {
  const frame: Record<string, unknown> = { op: 'subscribe', id, channel };
  if (since) frame.since = { epoch: since.epoch, offset: since.offset };
  return JSON.stringify(frame);
}
