import { type ClientOptions, type Handlers, type Subscription, type Transport } from './types.js';
export declare function isChannelName(name: unknown): name is string;
/** The defaults of every option (see `ClientOptions`). */
export declare const DEFAULTS: {
    readonly transport: Transport;
    readonly refreshBeforeMs: 30000;
    readonly minDelayMs: 500;
    readonly maxDelayMs: 15000;
    readonly drainJitterMs: 500;
    readonly pingIntervalMs: 20000;
    readonly pongTimeoutMs: 10000;
};
export declare class HeraldClient {
    readonly transport: Transport;
    private readonly options;
    private readonly tokens;
    private readonly open;
    private ws;
    constructor(options?: ClientOptions);
    private linkSettings;
    /**
     * Subscribes to `channels` (one name or several). Over SSE each call opens its own stream; over
     * WebSocket every call shares the client's one socket, and channels can be added (another call) and
     * removed (`close`) while it runs.
     */
    subscribe<T = unknown>(channels: string | readonly string[], handlers?: Handlers<T>): Subscription;
    private socket;
    /** Closes every subscription of this client. */
    close(): void;
}
/** Makes a client; see `ClientOptions` for what it takes. */
export declare function createClient(options?: ClientOptions): HeraldClient;
