import type { Database } from "lmdb";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { checkChars, clampFacts, LIMITS, preview } from "../common/limits.js";
import { storageError } from "../common/lmdb.js";
import { timestampMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import type { HostRecord } from "./model.js";

/**
 * The hosts the controller knows, where each is connected now, and what it
 * reported about itself. Proxies tell the controller when a host's stream
 * opens or closes; a host seen once stays known while offline, so that
 * jobs can target it and it receives its tasks when it returns.
 */
/**
 * When a proxy says a host came or went, by the proxy's clock but never later
 * than the controller's: a "since" in the future would stop the host's tasks
 * from ever ending LOST. Every report of a host's presence (link or bundle)
 * goes through it.
 */
export function reportedSince(since: Timestamp | undefined, now: number): number {
  return since ? Math.min(timestampMs(since), now) : now;
}

export class Inventory {
  private readonly hosts = new Map<string, HostRecord>();

  /**
   * With a database, hosts survive a restart, as disconnected until their
   * proxy reports them. A host that was connected when the controller
   * stopped counts as disconnected from `startedAt` (the restart), not from
   * when it connected: how long a host has been unreachable bounds its
   * tasks (controller/task-bounds.ts).
   */
  constructor(
    private readonly db?: Database<HostRecord, string>,
    startedAt: number = Date.now(),
    private readonly onStoreError?: (err: unknown, hostId: string) => void,
  ) {
    if (!db) return;
    for (const { value } of db.getRange()) {
      // Held by its proxy until the controller stopped, as far as it knows.
      const heldUntil = value.connected ? { ...value.heldUntil, [value.proxy]: startedAt } : value.heldUntil;
      // Facts stored before their limits existed are cut on load, so that one host cannot break listings for good.
      const facts = value.facts && clampFacts(value.facts).facts;
      this.hosts.set(value.id, { ...value, connected: false, since: value.connected ? startedAt : value.since, heldUntil, facts });
    }
  }

  private save(rec: HostRecord): void {
    // A host's connection state is kept in memory first; a failed write is logged, and corrected by the next one.
    this.db?.put(rec.id, rec).catch((err: unknown) => this.onStoreError?.(err, rec.id));
  }

  /**
   * Applies an operator's label change to a host of `tenant` (removals first,
   * then sets) and resolves once it is stored. Hosts of other tenants are
   * reported like hosts that do not exist. `check` sees the record before and
   * after the change and may refuse it (authorization) before anything is kept.
   */
  async setLabels(
    tenant: string,
    id: string,
    change: { set: Record<string, string>; remove: readonly string[] },
    check?: (before: HostRecord, after: HostRecord) => void,
  ): Promise<HostRecord> {
    checkChars("host id", id, LIMITS.idChars);
    const rec = this.hosts.get(id);
    if (!rec || rec.tenant !== tenant) throw new NotFoundError(`host ${JSON.stringify(id)} not found`);
    const labels = { ...rec.labels };
    for (const key of change.remove) {
      checkLabelKey(key);
      delete labels[key];
    }
    for (const [key, value] of Object.entries(change.set)) {
      checkLabelKey(key);
      checkLabelValue(key, value);
      labels[key] = value;
    }
    if (Object.keys(labels).length > MAX_LABELS) throw new InvalidArgumentError(`a host may have at most ${MAX_LABELS} labels`);
    check?.(rec, { ...rec, labels });
    const current = this.hosts.get(id) ?? rec;
    const next: HostRecord = { ...current, labels };
    this.hosts.set(id, next);
    await this.db?.put(id, next).catch((err) => Promise.reject(storageError(err)));
    return next;
  }

  get(id: string): HostRecord | undefined {
    return this.hosts.get(id);
  }

  /** Every host of every tenant (for metrics). */
  all(): HostRecord[] {
    return [...this.hosts.values()];
  }

  /** Hosts of one tenant, sorted by id. */
  list(tenant: string): HostRecord[] {
    return [...this.hosts.values()].filter((h) => h.tenant === tenant).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  /**
   * A host's stream opened at a proxy. Its facts are cut to the fact limits
   * (common/limits.ts): what a host reports about itself is its own word,
   * and must never make the tenant's listings too large to answer.
   */
  connected(host: { id: string; tenant: string; facts?: HostFacts }, region: string, proxy: string, since: number): HostRecord {
    const prev = this.hosts.get(host.id);
    const heldUntil = { ...prev?.heldUntil };
    // The proxy it leaves (if it moved without a disconnect being reported) held it until now.
    if (prev?.connected && prev.proxy !== proxy) heldUntil[prev.proxy] = since;
    heldUntil[proxy] = 0;
    const rec: HostRecord = {
      id: host.id,
      tenant: host.tenant,
      region,
      proxy,
      connected: true,
      since,
      facts: host.facts ? clampFacts(host.facts).facts : prev?.facts,
      labels: prev?.labels ?? {},
      heldUntil,
    };
    this.hosts.set(host.id, rec);
    this.save(rec);
    return rec;
  }

  /**
   * A host reported in a results bundle from a site with no link: known and
   * targetable, never "connected" (work reaches it by bundle).
   */
  seen(host: { id: string; tenant: string; facts?: HostFacts }, region: string, proxy: string, since: number): HostRecord {
    const prev = this.hosts.get(host.id);
    if (prev?.connected) return prev;
    const rec: HostRecord = { id: host.id, tenant: host.tenant, region, proxy, connected: false, since, facts: host.facts ? clampFacts(host.facts).facts : prev?.facts, labels: prev?.labels ?? {} };
    this.hosts.set(host.id, rec);
    this.save(rec);
    return rec;
  }

  /** A host left a proxy; ignored when it has already moved to another one. */
  disconnected(id: string, proxy: string, since: number): HostRecord | undefined {
    const rec = this.hosts.get(id);
    if (!rec || rec.proxy !== proxy || !rec.connected) return undefined;
    rec.connected = false;
    rec.since = since;
    rec.heldUntil = { ...rec.heldUntil, [proxy]: since };
    this.save(rec);
    return rec;
  }

  /** Every host held by a proxy whose link went down. */
  proxyLost(proxy: string, since: number): HostRecord[] {
    const lost: HostRecord[] = [];
    for (const rec of this.hosts.values()) {
      if (rec.proxy === proxy && rec.connected) {
        rec.connected = false;
        rec.since = since;
        rec.heldUntil = { ...rec.heldUntil, [proxy]: since };
        this.save(rec);
        lost.push(rec);
      }
    }
    return lost;
  }
}

const MAX_LABELS = LIMITS.labelsPerHost;
/** Label keys are query names, so that every label can be targeted by its bare name or as `label.<key>` (at most LIMITS.labelKeyChars). */
const LABEL_KEY = /^[A-Za-z0-9_][A-Za-z0-9._/-]{0,62}$/;

function checkLabelKey(key: string): void {
  if (!LABEL_KEY.test(key)) {
    throw new InvalidArgumentError(`label key ${preview(key)} is not valid: use 1-63 letters, digits, '_', '.', '/' or '-', starting with a letter, digit or '_'`);
  }
  if (key.startsWith("label.") || key.startsWith("fact.")) {
    throw new InvalidArgumentError(`label key ${JSON.stringify(key)} cannot start with "label." or "fact." (those name query namespaces)`);
  }
}

function checkLabelValue(key: string, value: string): void {
  if (value.length > LIMITS.labelValueChars || /[\u0000-\u001f\u007f]/.test(value)) {
    throw new InvalidArgumentError(`label ${key}: the value must be at most ${LIMITS.labelValueChars} characters without control characters`);
  }
}
