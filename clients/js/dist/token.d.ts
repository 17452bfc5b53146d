import type { TokenProvider } from './types.js';
/** The `exp` claim of a JWT in milliseconds since the Unix epoch, or null (no claim, not a JWT). */
export declare function tokenExpiry(token: string | null | undefined): number | null;
/** The token in use, with when to replace it. */
export declare class TokenSource {
    private readonly provider;
    private readonly refreshBeforeMs;
    private readonly now;
    private token;
    private have;
    private expiresAt;
    private obtainedAt;
    private pending;
    constructor(provider: TokenProvider | undefined, refreshBeforeMs: number, now?: () => number);
    /** Whether there is a `getToken` at all. */
    get enabled(): boolean;
    /** The token last obtained (null: none, or anonymous). */
    get current(): string | null;
    /** When the current token should be replaced (ms since the epoch), or null when it does not expire. */
    refreshAt(): number | null;
    /** True when the current token is due for replacement (or already expired). */
    due(): boolean;
    /** True when the current token's `exp` has passed (or passes within `withinMs`). */
    expired(withinMs?: number): boolean;
    /** The token to connect with: the current one unless it is due, else a fresh one. */
    get(): Promise<string | null>;
    /** Asks the application for a new token (one call at a time; concurrent callers share it). */
    fresh(): Promise<string | null>;
    /** Herald said when the token expires (WebSocket `refreshed`); trust that over the claim. */
    setExpiry(unixSeconds: number | null | undefined): void;
    /** The current token was refused: the next `get` asks for a new one. */
    invalidate(): void;
}
