/**
 * The audit log: an append-only record of who asked for what, on which
 * hosts, and what was decided. Every submit, cancel and label change and
 * every refusal is written here; enrollment and revocation append their own
 * kinds ("enroll", "revoke", ...) through {@link AuditLog.append}.
 */
import type { Database } from "lmdb";
import type { Clock } from "../common/clock.js";
import type { IdGenerator } from "../common/ids.js";
import { LIMITS, truncate } from "../common/limits.js";
import { storageError } from "../common/lmdb.js";

export type AuditDecision = "allowed" | "denied" | "rejected";

/** What a caller appends; the log adds id and time. */
export interface AuditInput {
  /** "submit", "cancel", "label", "audit", "enroll", "revoke", ... */
  kind: string;
  tenant: string;
  /** Who acted, e.g. "operator:acme/alice" (formatIdentity) or a token id. */
  actor: string;
  /** allowed; denied (authorization); rejected (malformed, unknown host, ...). */
  decision: AuditDecision;
  /** Why it was refused, or the role that allowed it. */
  reason?: string;
  /** A summary of what was asked: command, label change, job. Never a sensitive value. */
  what?: string;
  hostIds?: readonly string[];
  jobId?: string;
}

export interface AuditEvent {
  id: string;
  time: number;
  kind: string;
  tenant: string;
  actor: string;
  decision: AuditDecision;
  reason: string;
  what: string;
  /** The first {@link MAX_AUDIT_HOSTS} host ids. */
  hostIds: string[];
  hostCount: number;
  jobId: string;
}

/** Host ids kept per event; hostCount says how many there were. */
export const MAX_AUDIT_HOSTS = LIMITS.auditHosts;

/** Where events are kept: ordered by id (time-ordered ids, so by time). */
export interface AuditStore {
  put(event: AuditEvent): Promise<void>;
  /** Events newest first. */
  newestFirst(): Iterable<AuditEvent>;
}

export class MemoryAuditStore implements AuditStore {
  readonly events: AuditEvent[] = [];
  async put(event: AuditEvent): Promise<void> {
    this.events.push(event);
    this.events.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }
  *newestFirst(): Iterable<AuditEvent> {
    for (let i = this.events.length - 1; i >= 0; i--) yield this.events[i]!;
  }
}

/** The "audit" database of the controller's LMDB environment, keyed by event id. */
export class LmdbAuditStore implements AuditStore {
  constructor(private readonly db: Database<AuditEvent, string>) {}
  async put(event: AuditEvent): Promise<void> {
    await this.db.put(event.id, event).catch((err: unknown) => Promise.reject(storageError(err)));
  }
  *newestFirst(): Iterable<AuditEvent> {
    for (const { value } of this.db.getRange({ reverse: true })) yield value;
  }
}

export class AuditLog {
  constructor(private readonly deps: { store: AuditStore; clock: Clock; ids: IdGenerator }) {}

  /**
   * Appends an event; resolves once it is committed. Every field is cut to
   * its limit (common/limits.ts) with a visible marker rather than refused:
   * inputs echoed here may come from unauthenticated callers, and an event
   * must never be lost, nor make the tenant's log unreadable, because a
   * field was huge.
   */
  async append(input: AuditInput): Promise<AuditEvent> {
    const hostIds = input.hostIds ?? [];
    const field = (s: string) => truncate(s, LIMITS.auditFieldChars);
    const event: AuditEvent = {
      id: this.deps.ids("a"),
      time: this.deps.clock.now(),
      kind: field(input.kind),
      tenant: field(input.tenant),
      actor: field(input.actor),
      decision: input.decision,
      reason: truncate(input.reason ?? "", LIMITS.auditTextChars),
      what: truncate(input.what ?? "", LIMITS.auditTextChars),
      hostIds: hostIds.slice(0, MAX_AUDIT_HOSTS).map(field),
      hostCount: hostIds.length,
      jobId: field(input.jobId ?? ""),
    };
    await this.deps.store.put(event);
    return event;
  }

  /** The newest `limit` events of a tenant at or after `since`, oldest first. */
  list(tenant: string, opts: { sinceMs?: number; limit?: number } = {}): AuditEvent[] {
    const limit = Math.min(Math.max(opts.limit || 100, 1), 1000);
    const out: AuditEvent[] = [];
    for (const e of this.deps.store.newestFirst()) {
      if (opts.sinceMs !== undefined && e.time < opts.sinceMs) break;
      if (e.tenant !== tenant) continue;
      out.push(e);
      if (out.length >= limit) break;
    }
    return out.reverse();
  }
}
