/**
 * The controller's X25519 keys, with which daemons agree the keys that MAC
 * their task ends (common/end-mac.ts, docs/fan-out.md). Unlike the
 * task-signing key (a new one each start, only in memory), they are kept in
 * the controller's store: an end MAC'd before a restart, waiting in a
 * proxy's backlog or a daemon's outbox, or MAC'd after it by a daemon that
 * has not yet heard of the new start, must still be checked.
 *
 * The current key is handed out (carried by each start's task-signing key);
 * it is replaced when a controller starts and finds it older than
 * `rotateAfterMs`. A replaced key still checks the ends MAC'd under it for
 * `keepRetiredMs`, then is forgotten (its ends then count as unverified,
 * never as forged). The private keys are as secret as the store's records:
 * whoever can read them could as well rewrite the results stored beside
 * them.
 */
import type { Database } from "lmdb";
import type { Clock } from "../common/clock.js";
import { controllerKeyId } from "../common/end-mac.js";
import type { LmdbEnv } from "../common/lmdb.js";
import { storageError } from "../common/lmdb.js";
import type { Logger } from "../common/logger.js";
import { TASK_KEY_LIFETIME_MS } from "../common/task-signing.js";
import { keyHalfOf, newKeyHalf, type KeyHalf } from "../common/x25519.js";

/** A controller X25519 key as kept. */
export interface StoredEndKey {
  /** PKCS#8 DER. */
  readonly privateKey: Uint8Array;
  readonly createdAt: number;
  /** When a newer key replaced it. */
  readonly retiredAt?: number;
}

export interface EndKeyStore {
  list(): [string, StoredEndKey][];
  /** Resolves once durable. */
  put(id: string, key: StoredEndKey): Promise<void>;
  remove(id: string): Promise<void>;
}

export class MemoryEndKeyStore implements EndKeyStore {
  readonly keys = new Map<string, StoredEndKey>();
  list() {
    return [...this.keys];
  }
  async put(id: string, key: StoredEndKey) {
    this.keys.set(id, key);
  }
  async remove(id: string) {
    this.keys.delete(id);
  }
}

export class LmdbEndKeyStore implements EndKeyStore {
  private readonly db: Database<StoredEndKey, string>;

  constructor(env: LmdbEnv) {
    this.db = env.db<StoredEndKey>("end-keys");
  }
  list(): [string, StoredEndKey][] {
    return [...this.db.getRange()].map(({ key, value }) => [key, value]);
  }
  put(id: string, key: StoredEndKey): Promise<void> {
    return this.db.put(id, key).then(() => undefined, (err: unknown) => Promise.reject(storageError(err)));
  }
  remove(id: string): Promise<void> {
    return this.db.remove(id).then(() => undefined, (err: unknown) => Promise.reject(storageError(err)));
  }
}

export interface EndKeyRingOptions {
  /** Age at which a start replaces the current key. Default: a task-signing key's lifetime (30 days). */
  rotateAfterMs?: number;
  /** How long a replaced key still checks ends. Default 90 days. */
  keepRetiredMs?: number;
  /** Keys kept at most, the current one included (the oldest replaced ones go first). Default 16. */
  maxKeys?: number;
  log?: Logger;
}

export class EndKeyRing {
  private constructor(
    private readonly keys: ReadonlyMap<string, KeyHalf>,
    /** The key daemons are handed now. */
    readonly current: KeyHalf & { id: string },
  ) {}

  /**
   * The keys in `store`, the current one replaced if it is too old (or made
   * if there is none), those replaced too long ago removed. Resolves once
   * the current key is durable: daemons may MAC with it as soon as it is
   * handed out.
   */
  static async open(store: EndKeyStore, clock: Clock, opts: EndKeyRingOptions = {}): Promise<EndKeyRing> {
    const rotateAfterMs = opts.rotateAfterMs ?? TASK_KEY_LIFETIME_MS;
    const keepRetiredMs = opts.keepRetiredMs ?? 90 * 86_400_000;
    const maxKeys = Math.max(1, opts.maxKeys ?? 16);
    const now = clock.now();
    const writes: Promise<void>[] = [];
    const kept: { id: string; stored: StoredEndKey; half: KeyHalf }[] = [];
    for (const [id, stored] of store.list().sort((a, b) => a[1].createdAt - b[1].createdAt)) {
      if (stored.retiredAt !== undefined && now - stored.retiredAt > keepRetiredMs) {
        writes.push(store.remove(id));
        continue;
      }
      try {
        kept.push({ id, stored, half: keyHalfOf(stored.privateKey) });
      } catch (err) {
        opts.log?.error("a stored controller X25519 key cannot be read: ends MAC'd under it count as unverified", { key: id, err });
      }
    }
    // The newest key not yet replaced is the current one; any other was replaced by it.
    const newest = kept.findLast((k) => k.stored.retiredAt === undefined);
    const retire = (k: (typeof kept)[number]) => {
      k.stored = { ...k.stored, retiredAt: now };
      writes.push(store.put(k.id, k.stored));
    };
    for (const k of kept) if (k !== newest && k.stored.retiredAt === undefined) retire(k);
    let current = newest;
    if (!current || now - current.stored.createdAt >= rotateAfterMs) {
      if (current) retire(current);
      const half = newKeyHalf();
      current = { id: controllerKeyId(half.publicKey), stored: { privateKey: half.privateKey.export({ type: "pkcs8", format: "der" }), createdAt: now }, half };
      kept.push(current);
      writes.push(store.put(current.id, current.stored));
    }
    while (kept.length > maxKeys) {
      const oldest = kept.findIndex((k) => k !== current);
      writes.push(store.remove(kept[oldest]!.id));
      kept.splice(oldest, 1);
    }
    await Promise.all(writes);
    return new EndKeyRing(new Map(kept.map((k) => [k.id, k.half])), { id: current.id, ...current.half });
  }

  /** A key by id, if the controller still holds it. */
  get(id: string): KeyHalf | undefined {
    return this.keys.get(id);
  }
}
