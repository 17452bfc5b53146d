import { Link, type LinkSettings } from './link.js';
import type { TokenSource } from './token.js';
import { type ConnectionState, type Handlers, type Position, type StateInfo, type Subscription } from './types.js';
export interface WsSettings extends LinkSettings {
    readonly WebSocket: typeof WebSocket;
    readonly pingIntervalMs: number;
    readonly pongTimeoutMs: number;
}
/** One `subscribe` call over the client's socket. */
export declare class WsSubscription implements Subscription {
    private readonly link;
    readonly channels: readonly string[];
    readonly handlers: Handlers;
    /** Channels announced to this subscription (`onSubscribed`): only those reach it. */
    readonly announced: Set<string>;
    closed: boolean;
    constructor(link: WsLink, channels: readonly string[], handlers: Handlers);
    get state(): ConnectionState;
    position(channel: string): Position | undefined;
    close(): void;
}
export declare class WsLink extends Link {
    private readonly ws;
    private readonly tokens;
    /** Called once the last subscription left (the client drops this link). */
    private readonly onEmpty;
    private readonly tracker;
    private readonly channels;
    private readonly subs;
    private socket;
    private isOpen;
    private nextId;
    private pending;
    private lastFrameAt;
    private pingTimer;
    private pongTimer;
    private refreshTimer;
    private generation;
    /** Attempts in a row that closed before the socket opened. */
    private failedOpens;
    private lastInfo;
    constructor(ws: WsSettings, tokens: TokenSource, 
    /** Called once the last subscription left (the client drops this link). */
    onEmpty: () => void);
    position(channel: string): Position | undefined;
    /** Adds a subscription; its channels are subscribed on the socket unless another holds them. */
    attach(channels: readonly string[], handlers: Handlers): WsSubscription;
    /** Removes a subscription; channels no other one holds are unsubscribed. */
    detach(sub: WsSubscription): void;
    protected emit(state: ConnectionState, info: StateInfo): void;
    private errorToAll;
    protected open(url: string): void;
    protected shut(): void;
    private connect;
    private send;
    private requestSubscribe;
    private announce;
    private onFrame;
    private onMessage;
    private onReset;
    private deliverReset;
    private onSubscribed;
    private onUnsubscribed;
    private onError;
    private onSubscribeRefused;
    private onClose;
    private armPing;
    /** Sends `ping`; without a `pong` in time the socket is taken for dead and replaced. */
    private ping;
    private scheduleRefresh;
    private retryRefreshLater;
    /** Asks the application for a fresh token and hands it to Herald on the open socket. */
    private refresh;
    protected onVisible(): void;
}
