import type { Position } from './types.js';
/** Resolves a base URL against the page (a relative base needs one) and makes it end with `/`. */
export declare function resolveBase(base: string, page?: string): URL;
export interface SseUrlOptions {
    readonly token?: string | null;
    /** The last cursor received (sent as `last_event_id`: a new EventSource cannot set the header). */
    readonly lastEventId?: string | null;
    /** The page URL relative bases resolve against (default: the page's own). */
    readonly page?: string;
}
/** `…/v1/sse?channel=A&channel=B[&token=…][&last_event_id=…]` */
export declare function sseUrl(base: string, channels: readonly string[], options?: SseUrlOptions): string;
/** `ws[s]://…/v1/ws[?token=…]` (the scheme follows the base's: http gives ws, https gives wss). */
export declare function wsUrl(base: string, options?: {
    token?: string | null;
    page?: string;
}): string;
/** The WebSocket `subscribe` operation. */
export declare function subscribeFrame(id: number, channel: string, since?: Position | null): string;
