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
 * The store in the controller's LMDB environment. Events are kept by seq
 * with an index by (tenant, host, id); the oldest evaluated ones are
 * dropped past `maxEvents` or `retentionMs`, and with them their ids (a
 * copy sent again after that would be taken as new: retention is longer
 * than any backlog is expected to hold an event).
 */
export class LmdbTriggerStore implements TriggerStore {
  private readonly eventsDb: Database<EventRecord, number>;
  private readonly idsDb: Database<number, string[]>;
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
      this.idsDb.putSync(idKey, seq);
    });
    this.writing.set(inFlight, write);
    try {
      await write;
    } finally {
      this.writing.delete(inFlight);
    }
    this.pending.add(seq);
    this.count++;
    await this.prune();
    return true;
  }

  /** Events being written now, by (tenant, host, id). */
  private readonly writing = new Map<string, Promise<unknown>>();

  /** Drops the oldest evaluated events past the count or the retention. */
  private async prune(): Promise<void> {
    const cutoff = this.opts.now() - this.opts.retentionMs;
    const gone: EventRecord[] = [];
    let count = this.count;
    for (const { value } of this.eventsDb.getRange({})) {
      if (count <= this.opts.maxEvents && value.receivedAt >= cutoff) break;
      if (!value.evaluated) break; // never before it is evaluated
      gone.push(value);
      count--;
    }
    if (gone.length === 0) return;
    // Synchronous writes inside the transaction: they commit (or fail) together.
    await this.env.root.transaction(() => {
      for (const e of gone) {
        this.eventsDb.removeSync(e.seq);
        this.idsDb.removeSync([e.tenant, e.hostId, e.eventId]);
      }
    });
    this.count -= gone.length;
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
