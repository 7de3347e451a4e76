import { createHash, randomBytes } from "node:crypto";
import { sameIdentity, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { ResourceExhaustedError, UnauthenticatedError } from "../common/errors.js";

/**
 * Browser sessions of the web console (docs/console.md). An operator with
 * its certificate asks for a one-time link; opening it turns the link's
 * secret into a session whose secret the browser keeps in an HttpOnly
 * cookie. Both secrets are 256 random bits and only their SHA-256 is kept
 * (in memory: a controller restart logs every browser out). A session is
 * the operator identity it was made for, nothing more: every call made with
 * it is decided by the policy in force at the time of the call.
 */
export interface ConsoleSessionOptions {
  /** How long a link can be opened (default 2 minutes). */
  linkTtlMs?: number;
  /** How long a session lasts, from login (default 8 hours). */
  sessionTtlMs?: number;
  /** Links not yet opened, in all (default 1,000). */
  maxLinks?: number;
  /** Sessions open, in all (default 10,000). */
  maxSessions?: number;
  /** Links one operator may have waiting (default 5): beyond, its newest is refused, nobody else's. */
  maxLinksPerOperator?: number;
  /** Sessions one operator may have open (default 20): beyond, its oldest is ended. */
  maxSessionsPerOperator?: number;
  /** Random bytes; injected so tests can make secrets predictable. */
  random?: (n: number) => Uint8Array;
}

export interface ConsoleSession {
  readonly peer: PeerIdentity;
  readonly expiresAt: number;
}

/** A link or session as kept: for a link, when the certificate it was asked with expires. */
interface StoredSession extends ConsoleSession {
  readonly notAfter?: number;
}


/** Secrets are base64url of 32 bytes (43 characters); anything longer is refused before hashing. */
export const MAX_SECRET_CHARS = 64;
const SECRET = /^[A-Za-z0-9_-]{43}$/;

function hashOf(secret: string): string {
  return createHash("sha256").update(secret, "utf8").digest("hex");
}

/** A link opened a second time, before it would have expired: the operator it was made for is known. */
export class LinkReplayed extends UnauthenticatedError {
  constructor(
    message: string,
    readonly peer: PeerIdentity,
  ) {
    super(message);
  }
}

export class ConsoleSessions {
  private readonly links = new Map<string, StoredSession>();
  private readonly sessions = new Map<string, StoredSession>();
  /** Links opened already, until they would have expired: a second opening is someone else holding the link. */
  private readonly spent = new Map<string, StoredSession>();
  readonly linkTtlMs: number;
  readonly sessionTtlMs: number;
  private readonly maxLinks: number;
  private readonly maxSessions: number;
  private readonly maxLinksPerOperator: number;
  private readonly maxSessionsPerOperator: number;
  private readonly random: (n: number) => Uint8Array;

  constructor(
    private readonly clock: Clock,
    opts: ConsoleSessionOptions = {},
  ) {
    this.linkTtlMs = opts.linkTtlMs ?? 2 * 60_000;
    this.sessionTtlMs = opts.sessionTtlMs ?? 8 * 3_600_000;
    this.maxLinks = opts.maxLinks ?? 1_000;
    this.maxSessions = opts.maxSessions ?? 10_000;
    this.maxLinksPerOperator = opts.maxLinksPerOperator ?? 5;
    this.maxSessionsPerOperator = opts.maxSessionsPerOperator ?? 20;
    this.random = opts.random ?? randomBytes;
  }

  /**
   * A new one-time link secret for `peer`; shown once, kept hashed.
   * `notAfter`: when the certificate it was asked with expires — the session
   * it opens ends then at the latest, so a browser never outlives the
   * credential that let it in.
   */
  createLink(peer: PeerIdentity, notAfter = Number.POSITIVE_INFINITY): { secret: string; expiresAt: number } {
    const now = this.clock.now();
    const waiting = [...this.links.values()].filter((l) => now < l.expiresAt && sameIdentity(l.peer, peer)).length;
    if (waiting >= this.maxLinksPerOperator) {
      throw new ResourceExhaustedError(`${waiting} console links of yours are waiting to be opened (at most ${this.maxLinksPerOperator}); open one, or wait two minutes`);
    }
    return this.mint(this.links, this.maxLinks, "console links waiting to be opened", peer, Math.min(this.linkTtlMs, notAfter - now), notAfter);
  }

  /** Opens a link: valid once, before it expires. Returns the new session's secret, for the cookie. */
  redeem(linkSecret: string): { secret: string; session: ConsoleSession } {
    const refusal = "this console link is not valid (each link works once, for two minutes): run rexmesh console again";
    const key = SECRET.test(linkSecret) ? hashOf(linkSecret) : undefined;
    const spent = key === undefined ? undefined : this.spent.get(key);
    if (spent && this.clock.now() < spent.expiresAt) throw new LinkReplayed(refusal, spent.peer);
    const link = this.take(this.links, linkSecret, refusal);
    if (this.spent.size >= this.maxLinks) for (const [k, l] of this.spent) if (this.clock.now() >= l.expiresAt) this.spent.delete(k);
    // Bounded as the links are: past maxLinks unexpired, the oldest is forgotten (its replay is then refused unnamed).
    if (this.spent.size >= this.maxLinks) this.spent.delete(this.spent.keys().next().value!);
    this.spent.set(key!, link);
    // One operator's sessions beyond its share: its oldest ends (a browser left logged in somewhere), nobody else's.
    const own = [...this.sessions.entries()].filter(([, s]) => sameIdentity(s.peer, link.peer)).sort((a, b) => a[1].expiresAt - b[1].expiresAt);
    for (const [k] of own.slice(0, Math.max(0, own.length - this.maxSessionsPerOperator + 1))) this.sessions.delete(k);
    const notAfter = link.notAfter ?? Number.POSITIVE_INFINITY;
    const { secret, expiresAt } = this.mint(this.sessions, this.maxSessions, "console sessions", link.peer, Math.min(this.sessionTtlMs, notAfter - this.clock.now()));
    return { secret, session: { peer: link.peer, expiresAt } };
  }

  /** The session a cookie's secret names, if it is one and has not expired. */
  session(secret: string): ConsoleSession | undefined {
    if (!SECRET.test(secret)) return undefined;
    const key = hashOf(secret);
    const s = this.sessions.get(key);
    if (!s) return undefined;
    if (this.clock.now() >= s.expiresAt) {
      this.sessions.delete(key);
      return undefined;
    }
    return s;
  }

  /** Ends a session (logout); unknown secrets are ignored. */
  end(secret: string): void {
    if (SECRET.test(secret)) this.sessions.delete(hashOf(secret));
  }

  /** Ends every session of one operator (its identity was revoked). */
  endAllOf(match: (peer: PeerIdentity) => boolean): void {
    for (const [k, s] of this.sessions) if (match(s.peer)) this.sessions.delete(k);
    for (const [k, s] of this.links) if (match(s.peer)) this.links.delete(k);
  }

  private mint(into: Map<string, StoredSession>, max: number, what: string, peer: PeerIdentity, ttlMs: number, notAfter?: number): { secret: string; expiresAt: number } {
    const now = this.clock.now();
    if (!(ttlMs > 0)) throw new UnauthenticatedError("the certificate this console login was asked with has expired");
    if (into.size >= max) for (const [k, s] of into) if (now >= s.expiresAt) into.delete(k);
    if (into.size >= max) throw new ResourceExhaustedError(`too many ${what} (at most ${max}); try again later`);
    const secret = Buffer.from(this.random(32)).toString("base64url");
    const expiresAt = now + ttlMs;
    into.set(hashOf(secret), { peer, expiresAt, ...(notAfter !== undefined && Number.isFinite(notAfter) ? { notAfter } : {}) });
    return { secret, expiresAt };
  }

  private take(from: Map<string, StoredSession>, secret: string, refusal: string): StoredSession {
    if (!SECRET.test(secret)) throw new UnauthenticatedError(refusal);
    const key = hashOf(secret);
    const found = from.get(key);
    from.delete(key);
    if (!found || this.clock.now() >= found.expiresAt) throw new UnauthenticatedError(refusal);
    return found;
  }
}
