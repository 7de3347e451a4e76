import type { Database } from "lmdb";
import type { LmdbEnv } from "../common/lmdb.js";
import { storageError } from "../common/lmdb.js";
import type { JoinTokenRecord } from "./tokens.js";

/** A host id the controller has certified, and the key it certified: the machine that owns the id. */
export interface EnrolledHost {
  readonly id: string;
  readonly tenant: string;
  /** SHA-256 of the certified public key (SPKI). */
  readonly keyFingerprint: string;
  readonly enrolledAt: number;
  readonly notAfter: number;
  readonly serial: string;
  /** `token:<id>` or `enroll:<tenant>/<name>`. */
  readonly credential: string;
  /** The proxy that relayed the request, if any. */
  readonly relayedBy?: string;
}

/**
 * A join token as kept: the record of controller/tokens.ts, plus whether it
 * re-keys its bound host id (created with --rekey by an operator allowed to).
 */
export type StoredToken = JoinTokenRecord & { readonly rekey?: boolean };

/** What one enrollment writes, together or not at all. */
export interface EnrollWrite {
  readonly token?: { hash: string; record: StoredToken };
  readonly host: EnrolledHost;
}

/**
 * Tokens (by hash) and enrolled hosts (by id). `commit` re-runs the caller's
 * check on the records as they are inside the write transaction and applies
 * its writes only if the check passes, so the check and the spend are one
 * atomic, durable step whatever happens concurrently.
 */
export interface EnrollStore {
  getToken(hash: string): StoredToken | undefined;
  putToken(hash: string, record: StoredToken): Promise<void>;
  getHost(id: string): EnrolledHost | undefined;
  /** `check` throws to refuse; it must not have side effects. Resolves once durable. */
  commit(tokenHash: string | undefined, hostId: string, check: (token: StoredToken | undefined, host: EnrolledHost | undefined) => EnrollWrite): Promise<void>;
  /** Removes tokens that expired before `before`. */
  pruneTokens(before: number): Promise<number>;
}

export class MemoryEnrollStore implements EnrollStore {
  readonly tokens = new Map<string, StoredToken>();
  readonly hosts = new Map<string, EnrolledHost>();

  getToken(hash: string) {
    return this.tokens.get(hash);
  }
  async putToken(hash: string, record: StoredToken) {
    this.tokens.set(hash, record);
  }
  getHost(id: string) {
    return this.hosts.get(id);
  }
  async commit(tokenHash: string | undefined, hostId: string, check: (t: StoredToken | undefined, h: EnrolledHost | undefined) => EnrollWrite) {
    const w = check(tokenHash === undefined ? undefined : this.tokens.get(tokenHash), this.hosts.get(hostId));
    if (w.token) this.tokens.set(w.token.hash, w.token.record);
    this.hosts.set(w.host.id, w.host);
  }
  async pruneTokens(before: number) {
    let n = 0;
    for (const [h, r] of this.tokens) if (r.expiresAt < before && this.tokens.delete(h)) n++;
    return n;
  }
}

type Outcome = { ok: true } | { ok: false; error: unknown };

/** The store in the controller's LMDB environment (databases `join-tokens` and `enrolled-hosts`). */
export class LmdbEnrollStore implements EnrollStore {
  private readonly tokens: Database<StoredToken, string>;
  private readonly hosts: Database<EnrolledHost, string>;

  constructor(private readonly env: LmdbEnv) {
    this.tokens = env.db("join-tokens");
    this.hosts = env.db("enrolled-hosts");
  }

  getToken(hash: string) {
    return this.tokens.get(hash);
  }
  async putToken(hash: string, record: StoredToken) {
    this.env.checkRoomForWork("creating a join token");
    await this.tokens.put(hash, record).catch((err) => Promise.reject(storageError(err)));
  }
  getHost(id: string) {
    return this.hosts.get(id);
  }

  async commit(tokenHash: string | undefined, hostId: string, check: (t: StoredToken | undefined, h: EnrolledHost | undefined) => EnrollWrite) {
    this.env.checkRoomForWork("enrollment");
    // The callback runs inside the write transaction: its reads see every
    // earlier commit and nothing can interleave, so a use is spent once.
    const outcome = await this.env.root
      .transaction((): Outcome => {
        try {
          const w = check(tokenHash === undefined ? undefined : this.tokens.get(tokenHash), this.hosts.get(hostId));
          // Inside the transaction these resolve with its commit; a failure rejects the transaction itself.
          if (w.token) this.tokens.put(w.token.hash, w.token.record).catch(() => undefined);
          this.hosts.put(w.host.id, w.host).catch(() => undefined);
          return { ok: true };
        } catch (error) {
          return { ok: false, error };
        }
      })
      .catch((err) => Promise.reject(storageError(err)));
    if (!outcome.ok) throw outcome.error;
  }

  async pruneTokens(before: number) {
    const removals: Promise<boolean>[] = [];
    for (const { key, value } of this.tokens.getRange()) if (value.expiresAt < before) removals.push(this.tokens.remove(key));
    await Promise.all(removals);
    return removals.length;
  }
}
