/**
 * What an operator may do with triggers and events (docs/triggers.md),
 * decided the way schedules are (controller/access.ts): a trigger's job is
 * its creator's, authorized as the creator's submit each time it fires;
 * another operator sees a trigger only when its read roles cover every
 * host the job can reach, and changes it only when it may submit that job
 * itself. Events are shown for the hosts of the caller's tenant its read
 * roles cover.
 */
import { fromBinary } from "@bufbuild/protobuf";
import type { PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { AlreadyExistsError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import { SubmitJobRequestSchema, type SubmitJobRequest } from "../gen/rexmesh/v1/controller_pb.js";
import type { TriggerSpec } from "../gen/rexmesh/v1/trigger_pb.js";
import type { OperatorAccess } from "./access.js";
import type { DocumentStore } from "./document-store.js";
import { parseTarget, type SubmitRequest } from "./jobs.js";
import { submitRequestOf } from "./planner.js";
import { selectHosts } from "./query.js";
import type { Inventory } from "./inventory.js";
import type { EventRecord, TriggerRecord, TriggerStore } from "./trigger-store.js";
import { newTrigger, type TriggerEvaluator } from "./triggers.js";

export interface TriggerAccessDeps {
  access: OperatorAccess;
  store: TriggerStore;
  evaluator: TriggerEvaluator;
  inventory: Inventory;
  clock: Clock;
  documents?: DocumentStore;
}

/** The job a trigger's firing submits for an event: on the reporting host unless the trigger names its own hosts. */
export function firingRequest(rec: TriggerRecord, hostId: string): SubmitRequest {
  const req = submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request));
  return rec.targeted ? { ...req, trigger: rec.name } : { ...req, hostIds: [hostId], trigger: rec.name };
}

/** The hosts a trigger's job may reach, as a request the planner resolves: its own, or (untargeted) every host of the tenant. */
function reachOf(rec: TriggerRecord): SubmitRequest {
  const req = submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request));
  return rec.targeted ? req : { ...req, allHosts: true };
}

export class TriggerAccess {
  constructor(private readonly deps: TriggerAccessDeps) {}

  /**
   * A new trigger of the caller's tenant. A job with its own hosts must be
   * one the caller may submit now (a dry run, audited as one); a job for
   * the reporting host is authorized on that host each time it fires.
   */
  async createTrigger(caller: PeerIdentity, spec: TriggerSpec): Promise<TriggerRecord> {
    const job: SubmitJobRequest | undefined = spec.job;
    // A document by name is pinned to its newest version now: who may change the document must not change what the trigger runs.
    if (job?.document && !job.document.includes("@") && this.deps.documents) {
      const doc = this.deps.documents.get(caller.scope, job.document);
      job.document = `${doc.name}@${doc.version}`;
    }
    const rec = newTrigger(caller, spec, this.deps.clock.now());
    this.deps.access.requireAction(caller, "submit");
    if (rec.targeted) await this.deps.access.dryRun(caller, submitRequestOf(job!));
    else if (job!.steps.length === 0 && !job!.document && !job!.documentContent) throw new InvalidArgumentError("a trigger's job needs a command, steps or a document");
    await this.deps.evaluator.exclusive(async () => {
      if (this.deps.store.getTrigger(caller.scope, rec.name)) throw new AlreadyExistsError(`trigger ${JSON.stringify(rec.name)} exists already`);
      if (this.deps.store.triggers(caller.scope).length >= LIMITS.triggersPerTenant) throw new ResourceExhaustedError(`the tenant has ${LIMITS.triggersPerTenant} triggers already`);
      await this.deps.store.putTrigger(rec);
    });
    return rec;
  }

  listTriggers(caller: PeerIdentity): TriggerRecord[] {
    return this.deps.store.triggers(caller.scope).filter((r) => this.deps.access.maySeeStandingJob(caller, r.creator, reachOf(r)));
  }

  /** A trigger of the caller's tenant it may see; NOT_FOUND otherwise. */
  getTrigger(caller: PeerIdentity, name: string): TriggerRecord {
    const rec = this.deps.store.getTrigger(caller.scope, name);
    if (!rec || !this.deps.access.maySeeStandingJob(caller, rec.creator, reachOf(rec))) throw new NotFoundError(`no trigger ${JSON.stringify(name)}`);
    return rec;
  }

  async pauseTrigger(caller: PeerIdentity, name: string, paused: boolean): Promise<TriggerRecord> {
    const rec = this.getTrigger(caller, name);
    await this.deps.access.mayChangeStandingJob(caller, rec.creator, reachOf(rec));
    return this.deps.evaluator.setPaused(caller.scope, name, paused);
  }

  async deleteTrigger(caller: PeerIdentity, name: string): Promise<void> {
    const rec = this.getTrigger(caller, name);
    await this.deps.access.mayChangeStandingJob(caller, rec.creator, reachOf(rec));
    await this.deps.evaluator.exclusive(async () => {
      if (!this.deps.store.getTrigger(caller.scope, name)) throw new NotFoundError(`no trigger ${JSON.stringify(name)}`);
      await this.deps.store.removeTrigger(caller.scope, name);
    });
  }

  /** One firing: the creator's submit of the trigger's job for the event's host, under `key`. */
  fire(rec: TriggerRecord, event: EventRecord, key: string): Promise<string> {
    return this.deps.access.fireAs(rec.creator, { ...firingRequest(rec, event.hostId), idempotencyKey: key });
  }

  /**
   * Recent events of the caller's tenant, newest first, paged: of hosts
   * its read roles cover and, with a target, that match it now.
   */
  listEvents(caller: PeerIdentity, opts: { target: string; kind: string; pageSize: number; pageToken: string }): { events: EventRecord[]; next: string } {
    const limit = opts.pageSize === 0 ? 50 : opts.pageSize;
    if (limit > LIMITS.eventsPage) throw new InvalidArgumentError(`page_size must be at most ${LIMITS.eventsPage}`);
    if (opts.kind.length > LIMITS.eventNameChars) throw new InvalidArgumentError(`kind is longer than ${LIMITS.eventNameChars} characters`);
    let before: number | undefined;
    if (opts.pageToken) {
      before = /^\d{1,15}$/.test(opts.pageToken) ? Number(opts.pageToken) : NaN;
      if (!Number.isSafeInteger(before)) throw new InvalidArgumentError("page_token is not one this controller gave");
    }
    let allowed: Set<string> | undefined;
    if (opts.target) {
      const matched = selectHosts(parseTarget(opts.target), this.deps.inventory.list(caller.scope)).map((h) => h.id);
      allowed = this.deps.access.readableIds(caller, matched);
    }
    const cache = new Map<string, boolean>();
    const host = (id: string) => {
      if (allowed) return allowed.has(id);
      let ok = cache.get(id);
      if (ok === undefined) cache.set(id, (ok = this.deps.access.readableIds(caller, [id]).has(id)));
      return ok;
    };
    const page = this.deps.store.events({ tenant: caller.scope, kind: opts.kind || undefined, host, before, limit });
    return { events: page.events, next: page.next === undefined ? "" : String(page.next) };
  }
}
