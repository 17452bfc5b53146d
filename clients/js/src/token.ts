// Tokens: the application's `getToken`, called as rarely as possible, and when each token should be
// replaced (from its `exp` claim, read without checking the signature: Herald checks it).

import type { TokenProvider } from './types.js';

/** The `exp` claim of a JWT in milliseconds since the Unix epoch, or null (no claim, not a JWT). */
export function tokenExpiry(token: string | null | undefined): number | null {
  if (!token) return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = base64 + '='.repeat((4 - (base64.length % 4)) % 4);
    const claims: unknown = JSON.parse(atob(padded));
    if (!claims || typeof claims !== 'object') return null;
    const exp = (claims as { exp?: unknown }).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** The token in use, with when to replace it. */
export class TokenSource {
  private token: string | null = null;
  private have = false;
  private expiresAt: number | null = null;
  private obtainedAt = 0;
  private pending: Promise<string | null> | null = null;

  constructor(
    private readonly provider: TokenProvider | undefined,
    private readonly refreshBeforeMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Whether there is a `getToken` at all. */
  get enabled(): boolean {
    return this.provider !== undefined;
  }

  /** The token last obtained (null: none, or anonymous). */
  get current(): string | null {
    return this.token;
  }

  /** When the current token should be replaced (ms since the epoch), or null when it does not expire. */
  refreshAt(): number | null {
    if (this.expiresAt === null) return null;
    const lifetime = Math.max(0, this.expiresAt - this.obtainedAt);
    return this.expiresAt - Math.min(this.refreshBeforeMs, lifetime / 2);
  }

  /** True when the current token is due for replacement (or already expired). */
  due(): boolean {
    const at = this.refreshAt();
    return at !== null && this.now() >= at;
  }

  /** True when the current token's `exp` has passed (or passes within `withinMs`). */
  expired(withinMs = 0): boolean {
    return this.expiresAt !== null && this.now() + withinMs >= this.expiresAt;
  }

  /** The token to connect with: the current one unless it is due, else a fresh one. */
  async get(): Promise<string | null> {
    if (!this.provider) return null;
    if (this.have && !this.due()) return this.token;
    return this.fresh();
  }

  /** Asks the application for a new token (one call at a time; concurrent callers share it). */
  fresh(): Promise<string | null> {
    if (!this.provider) return Promise.resolve(null);
    if (!this.pending) {
      const provider = this.provider;
      this.pending = (async () => {
        try {
          const value = await provider();
          const token = typeof value === 'string' && value !== '' ? value : null;
          this.token = token;
          this.have = true;
          this.obtainedAt = this.now();
          this.expiresAt = tokenExpiry(token);
          return token;
        } finally {
          this.pending = null;
        }
      })();
    }
    return this.pending;
  }

  /** Herald said when the token expires (WebSocket `refreshed`); trust that over the claim. */
  setExpiry(unixSeconds: number | null | undefined): void {
    if (typeof unixSeconds === 'number' && Number.isFinite(unixSeconds)) this.expiresAt = unixSeconds * 1000;
  }

  /** The current token was refused: the next `get` asks for a new one. */
  invalidate(): void {
    this.have = false;
  }
}
