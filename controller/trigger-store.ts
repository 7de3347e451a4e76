/**
 * Where events and triggers are kept (docs/triggers.md): recent events,
 * one per (tenant, host, event id), and the triggers with each one's
 * per-host firing times. An event's evaluation is stored in one commit
 * with what it changed (the triggers' counts, the hosts' firing times), so
 * that a controller that stops between an event and its evaluation
 * evaluates it again from the same state after its restart.
 */
import type { Database } from "lmdb";
import type { PeerIdentity } from "../certs/identity.js";
import type { LmdbEnv } from "../common/lmdb.js";

/** What one trigger did with one event. */
export interface EventOutcome {
  trigger: string;
  jobId: string;
  /** Why no job was queued (cooldown, rate limit, paused, refused), else empty. */
  note: string;
}

export interface EventRecord {
  /** Order of arrival at this controller. */
  seq: number;
  tenant: string;
  hostId: string;
  eventId: string;
  kind: string;
  details: Record<string, string>;
  /** When the host noticed it (its clock), epoch ms. */
  time: number;
  watcher: string;
  /** When this controller stored it: cooldowns and rate limits count on this clock. */
  receivedAt: number;
  evaluated: boolean;
  outcomes: EventOutcome[];
}

export interface TriggerFiring {
  at: number;
  hostId: string;
  eventId: string;
  jobId: string;
  note: string;
}

export interface TriggerRecord {
  tenant: string;
  name: string;
  /** The match expression as given (controller/trigger-match.ts). */
  on: string;
  /** The job each firing submits: a SubmitJobRequest in protobuf binary. */
  request: Uint8Array;
  /** Whether the job names its own hosts; otherwise it runs on the host that reported the event. */
  targeted: boolean;
  cooldownMs: number;
  maxPerHost: number;
  windowMs: number;
  creator: PeerIdentity;
  createdAt: number;
  paused: boolean;
  fired: number;
  suppressed: number;
  /** The latest firings and suppressions, newest last. */
  recent: TriggerFiring[];
}

/** A trigger's firings for one host: the times within its rate window, and the last job. */
export interface HostFirings {
  times: number[];
  lastJobId: string;
}

export interface EventQuery {
  tenant: string;
  kind?: string;
  /** Only events of hosts this accepts. */
  host?: (hostId: string) => boolean;
  /** Events older than this seq (a page token); undefined: from the newest. */
  before?: number;
  limit: number;
}

export interface TriggerStore {
  /** Stores an event once: false when (tenant, host, id) is already held. */
  addEvent(rec: Omit<EventRecord, "seq" | "evaluated" | "outcomes">): Promise<boolean>;
  hasEvent(tenant: string, hostId: string, eventId: string): boolean;
  /** Events not yet evaluated, oldest first. */
  unevaluated(): EventRecord[];
  /** Newest first; `next` is the seq to page on from, if more may follow. */
  events(q: EventQuery): { events: EventRecord[]; next?: number };
  triggers(tenant: string): TriggerRecord[];
  getTrigger(tenant: string, name: string): TriggerRecord | undefined;
  putTrigger(rec: TriggerRecord): Promise<void>;
  /** Removes a trigger and its hosts' firing times. */
  removeTrigger(tenant: string, name: string): Promise<void>;
  hostFirings(tenant: string, name: string, hostId: string): HostFirings | undefined;
  /** One commit: the event evaluated with its outcomes, the triggers and host firings it changed. */
  commitEvaluation(event: EventRecord, triggers: readonly TriggerRecord[], firings: readonly { name: string; hostId: string; firings: HostFirings }[]): Promise<void>;
}

/**
 * The store in the controller's LMDB environment. Events are kept by seq,
 * their ids by (tenant, host, id) with when they were first received.
 * Past `maxEvents`, the oldest evaluated event of the tenant holding the
 * most goes first (one tenant's flood never wipes another's history); past
 * `retentionMs`, any. An id is kept for `retentionMs` whatever happened to
 * its event, so a copy that comes again (a proxy's replay, a bundle
 * imported twice) is known as long as the intake takes events that old
 * (controller/event-intake.ts refuses older ones).
 */
export class LmdbTriggerStore implements TriggerStore {
  private readonly eventsDb: Database<EventRecord, number>;
  /** [tenant, host, event id] → when it was first received (ms). */
  private readonly idsDb: Database<number, string[]>;
  /** Events kept per tenant. */
  private readonly perTenant = new Map<string, number>();
  private lastIdSweep = 0;
  private readonly triggersDb: Database<TriggerRecord, string[]>;
  private readonly hostsDb: Database<HostFirings, string[]>;
  private readonly pending = new Set<number>();
  private next = 1;
  private count = 0;

  constructor(
    private readonly env: LmdbEnv,
    private readonly opts: { maxEvents: number; retentionMs: number; now: () => number },
  ) {
    this.eventsDb = env.db("events");
    this.idsDb = env.db("event-ids");
    this.triggersDb = env.db("triggers");
    this.hostsDb = env.db("trigger-hosts");
    for (const { key, value } of this.eventsDb.getRange({})) {
      this.next = Math.max(this.next, key + 1);
      this.count++;
      this.perTenant.set(value.tenant, (this.perTenant.get(value.tenant) ?? 0) + 1);
      if (!value.evaluated) this.pending.add(key);
    }
  }

  hasEvent(tenant: string, hostId: string, eventId: string): boolean {
    return this.idsDb.get([tenant, hostId, eventId]) !== undefined;
  }

  async addEvent(rec: Omit<EventRecord, "seq" | "evaluated" | "outcomes">): Promise<boolean> {
    const idKey = [rec.tenant, rec.hostId, rec.eventId];
    const inFlight = idKey.join("\0");
    // A copy that comes while the first is being written waits for that write: acknowledged only once the event is stored.
    for (let writing = this.writing.get(inFlight); writing; writing = this.writing.get(inFlight)) await writing.catch(() => undefined);
    if (this.idsDb.get(idKey) !== undefined) return false;
    const seq = this.next++;
    const full: EventRecord = { ...rec, seq, evaluated: false, outcomes: [] };
    // Synchronous writes inside the transaction: they commit (or fail) together.
    const write = this.env.root.transaction(() => {
      this.eventsDb.putSync(seq, full);
      this.idsDb.putSync(idKey, rec.receivedAt);
    });
    this.writing.set(inFlight, write);
    try {
      await write;
    } finally {
      this.writing.delete(inFlight);
    }
    this.pending.add(seq);
    this.count++;
    this.perTenant.set(rec.tenant, (this.perTenant.get(rec.tenant) ?? 0) + 1);
    await this.prune();
    return true;
  }

  /** Events being written now, by (tenant, host, id). */
  private readonly writing = new Map<string, Promise<unknown>>();

  /**
   * Drops evaluated events past the retention, then, past the count, the
   * oldest evaluated ones of the tenant that holds the most; ids past the
   * retention (at most once a minute).
   */
  private async prune(): Promise<void> {
    const now = this.opts.now();
    const cutoff = now - this.opts.retentionMs;
    const gone: EventRecord[] = [];
    for (const { value } of this.eventsDb.getRange({})) {
      if (value.receivedAt >= cutoff || !value.evaluated) break; // never before it is evaluated
      gone.push(value);
    }
    const counts = new Map(this.perTenant);
    for (const e of gone) counts.set(e.tenant, counts.get(e.tenant)! - 1);
    let count = this.count - gone.length;
    if (count > this.opts.maxEvents) {
      const dropped = new Set(gone.map((e) => e.seq));
      while (count > this.opts.maxEvents) {
        const [biggest] = [...counts].sort((a, b) => b[1] - a[1])[0] ?? [];
        if (biggest === undefined) break;
        let victim: EventRecord | undefined;
        for (const { value } of this.eventsDb.getRange({})) {
          if (value.tenant !== biggest || dropped.has(value.seq)) continue;
          if (value.evaluated) victim = value;
          break; // its oldest, if evaluated; otherwise wait for the evaluator
        }
        if (!victim) break;
        gone.push(victim);
        dropped.add(victim.seq);
        counts.set(biggest, counts.get(biggest)! - 1);
        count--;
      }
    }
    const oldIds: string[][] = [];
    if (now - this.lastIdSweep >= 60_000) {
      this.lastIdSweep = now;
      for (const { key, value } of this.idsDb.getRange({})) if (value < cutoff) oldIds.push(key);
    }
    if (gone.length === 0 && oldIds.length === 0) return;
    // Synchronous writes inside the transaction: they commit (or fail) together.
    await this.env.root.transaction(() => {
      for (const e of gone) this.eventsDb.removeSync(e.seq);
      for (const k of oldIds) this.idsDb.removeSync(k);
    });
    this.count -= gone.length;
    for (const e of gone) {
      const n = this.perTenant.get(e.tenant)! - 1;
      if (n > 0) this.perTenant.set(e.tenant, n);
      else this.perTenant.delete(e.tenant);
    }
  }

  unevaluated(): EventRecord[] {
    return [...this.pending].sort((a, b) => a - b).flatMap((seq) => this.eventsDb.get(seq) ?? []);
  }

  events(q: EventQuery): { events: EventRecord[]; next?: number } {
    const out: EventRecord[] = [];
    const range = this.eventsDb.getRange({ reverse: true, ...(q.before !== undefined ? { start: q.before - 1 } : {}) });
    for (const { value } of range) {
      if (value.tenant !== q.tenant || (q.kind && value.kind !== q.kind) || (q.host && !q.host(value.hostId))) continue;
      if (out.length === q.limit) return { events: out, next: out[out.length - 1]!.seq };
      out.push(value);
    }
    return { events: out };
  }

  triggers(tenant: string): TriggerRecord[] {
    return [...this.triggersDb.getRange({ start: [tenant], end: [tenant, "\uffff"] }).map(({ value }) => value)].filter((t) => t.tenant === tenant);
  }

  getTrigger(tenant: string, name: string): TriggerRecord | undefined {
    return this.triggersDb.get([tenant, name]);
  }

  async putTrigger(rec: TriggerRecord): Promise<void> {
    await this.triggersDb.put([rec.tenant, rec.name], rec);
  }

  async removeTrigger(tenant: string, name: string): Promise<void> {
    const hosts = [...this.hostsDb.getKeys({ start: [tenant, name], end: [tenant, name, "\uffff"] })];
    // Synchronous writes inside the transaction: they commit (or fail) together.
    await this.env.root.transaction(() => {
      this.triggersDb.removeSync([tenant, name]);
      for (const k of hosts) if (k[0] === tenant && k[1] === name) this.hostsDb.removeSync(k);
    });
  }

  hostFirings(tenant: string, name: string, hostId: string): HostFirings | undefined {
    return this.hostsDb.get([tenant, name, hostId]);
  }

  async commitEvaluation(event: EventRecord, triggers: readonly TriggerRecord[], firings: readonly { name: string; hostId: string; firings: HostFirings }[]): Promise<void> {
    // Synchronous writes inside the transaction: they commit (or fail) together.
    await this.env.root.transaction(() => {
      this.eventsDb.putSync(event.seq, { ...event, evaluated: true });
      for (const t of triggers) this.triggersDb.putSync([t.tenant, t.name], t);
      for (const f of firings) this.hostsDb.putSync([event.tenant, f.name, f.hostId], f.firings);
    });
    this.pending.delete(event.seq);
  }
}
