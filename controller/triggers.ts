/**
 * Triggers (docs/triggers.md): an event a host reported that matches a
 * trigger's expression queues the trigger's job — an ordinary job of the
 * operator who created the trigger, authorized and audited as that
 * operator's submit when it fires — for the host that reported it (or the
 * trigger's own target).
 *
 * The rules an evaluation keeps:
 * - Once per event: events are stored once by (tenant, host, event id)
 *   (controller/trigger-store.ts) and evaluated in the order they arrived.
 * - Storms: after a job for a host, the trigger queues none for that host
 *   within its cooldown, and at most `maxPerHost` within its rate window;
 *   each event held back is recorded on the event and the trigger with why.
 *   Both count on the controller's clock when the event was stored, so a
 *   burst of events that waited behind a cut-off link counts as a burst.
 * - Durable: each firing is submitted under an idempotency key made of the
 *   trigger and the event, and only then is the event marked evaluated, in
 *   one commit with the trigger's counts and the host's firing times: a
 *   controller that stops between the two evaluates the event again after
 *   its restart, from the same state, and gets the same job back.
 */
import { createHash } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { formatDuration } from "../common/duration.js";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { codeOf } from "../common/rpc-errors.js";
import { SubmitJobRequestSchema } from "../gen/rexmesh/v1/controller_pb.js";
import { HostEventSchema } from "../gen/rexmesh/v1/event_pb.js";
import { EventOutcomeSchema, StoredEventSchema, TriggerFiringSchema, TriggerSchema, type StoredEvent, type Trigger, type TriggerSpec } from "../gen/rexmesh/v1/trigger_pb.js";
import { matches, parseMatch, type MatchTerm } from "./trigger-match.js";
import { Turns } from "./exclusive.js";
import { shownJob } from "./schedules.js";
import type { EventOutcome, EventRecord, HostFirings, TriggerFiring, TriggerRecord, TriggerStore } from "./trigger-store.js";

/** The idempotency keys of triggers' firings begin so; an operator's submit may not use it (controller/access.ts). */
/** Where a trigger with its own hosts keeps its firings (one cooldown and rate for the trigger; never a host id). */
const TARGETED_RATE_KEY = "\0trigger";

export const TRIGGER_KEY_PREFIX = "trigger:";

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const RECENT_MAX = 20;
const COOLDOWN_DEFAULT_MS = 10 * 60_000;
const WINDOW_DEFAULT_MS = 3600_000;
const MAX_PER_HOST_DEFAULT = 10;
const MAX_PER_HOST_LIMIT = 1000;
const SPAN_MAX_MS = 7 * 24 * 3600_000;

/**
 * A new trigger of `creator` from what the API was given: a name, a match
 * expression that parses, a job (neither a dry run nor an idempotency
 * key), a cooldown of 0 to 7 days, a rate of 1 to 1000 jobs per host in
 * a window of 1 s to 7 days. INVALID_ARGUMENT naming what is wrong.
 */
export function newTrigger(creator: PeerIdentity, spec: TriggerSpec, now: number): TriggerRecord {
  if (!NAME.test(spec.name)) throw new InvalidArgumentError(`trigger name ${JSON.stringify(spec.name.slice(0, 80))} is not 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)`);
  parseMatch(spec.on);
  if (!spec.job) throw new InvalidArgumentError("a trigger needs the job each firing submits (job)");
  if (spec.job.dryRun) throw new InvalidArgumentError("a trigger's job cannot be a dry run");
  if (spec.job.idempotencyKey) throw new InvalidArgumentError("a trigger's job takes no idempotency key: each firing has its own");
  const cooldownMs = spec.cooldown ? durationMs(spec.cooldown) : COOLDOWN_DEFAULT_MS;
  if (!(cooldownMs >= 0 && cooldownMs <= SPAN_MAX_MS)) throw new InvalidArgumentError("cooldown must be from 0 s to 7 days");
  const windowMs = spec.rateWindow ? durationMs(spec.rateWindow) : WINDOW_DEFAULT_MS;
  if (!(windowMs >= 1000 && windowMs <= SPAN_MAX_MS)) throw new InvalidArgumentError("the rate window must be from 1 s to 7 days");
  const maxPerHost = spec.maxPerHost || MAX_PER_HOST_DEFAULT;
  if (maxPerHost > MAX_PER_HOST_LIMIT) throw new InvalidArgumentError(`max_per_host must be from 1 to ${MAX_PER_HOST_LIMIT}`);
  const request = toBinary(SubmitJobRequestSchema, spec.job);
  if (request.length > LIMITS.scheduleJobBytes) throw new InvalidArgumentError(`a trigger's job is ${request.length} bytes; at most ${LIMITS.scheduleJobBytes} (put a large stdin or script in an artifact)`);
  const job = spec.job;
  return {
    tenant: creator.scope,
    name: spec.name,
    on: spec.on,
    request,
    targeted: job.hostIds.length > 0 || job.allHosts || job.target !== undefined,
    cooldownMs,
    maxPerHost,
    windowMs,
    creator: { ...creator },
    createdAt: now,
    paused: false,
    fired: 0,
    suppressed: 0,
    recent: [],
  };
}

/** A trigger as the API shows it; with `withJob`, its job too, the values of env, parameters and stdin left out. */
export function triggerToProto(rec: TriggerRecord, what: string, withJob: boolean): Trigger {
  const job = withJob ? shownJob(rec.request) : undefined;
  const dur = (ms: number) => ({ seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 });
  return create(TriggerSchema, {
    spec: { name: rec.name, on: rec.on, job, cooldown: dur(rec.cooldownMs), maxPerHost: rec.maxPerHost, rateWindow: dur(rec.windowMs) },
    createdBy: formatIdentity(rec.creator),
    createdAt: timestampFromMs(rec.createdAt),
    paused: rec.paused,
    fired: BigInt(rec.fired),
    suppressed: BigInt(rec.suppressed),
    recent: rec.recent.map((f) => create(TriggerFiringSchema, { at: timestampFromMs(f.at), hostId: f.hostId, eventId: f.eventId, jobId: f.jobId, note: f.note })),
    what,
  });
}

export function storedEventToProto(e: EventRecord): StoredEvent {
  return create(StoredEventSchema, {
    event: create(HostEventSchema, { id: e.eventId, hostId: e.hostId, tenant: e.tenant, kind: e.kind, details: e.details, time: timestampFromMs(e.time), watcher: e.watcher }),
    receivedAt: timestampFromMs(e.receivedAt),
    evaluated: e.evaluated,
    outcomes: e.outcomes.map((o) => create(EventOutcomeSchema, o)),
  });
}

/** The idempotency key of a trigger's firing for an event: the same for every evaluation of that event. */
export function firingKey(rec: TriggerRecord, event: EventRecord): string {
  const digest = createHash("sha256").update(`${rec.createdAt}\0${event.hostId}\0${event.eventId}`).digest("hex").slice(0, 32);
  return `${TRIGGER_KEY_PREFIX}${rec.name}:${digest}`;
}

export interface TriggerEvaluatorDeps {
  clock: Clock;
  store: TriggerStore;
  log: Logger;
  /**
   * Submits a firing as the trigger's creator for the event, under the
   * idempotency `key`; resolves with the job id, rejects with why it was
   * refused (UNAVAILABLE: the controller is stopping, try again later).
   */
  fire(rec: TriggerRecord, event: EventRecord, key: string): Promise<string>;
}

/**
 * Evaluates stored events against the triggers of their tenant, one event
 * at a time in arrival order; operators' changes to triggers take turns
 * with it (exclusive), so an evaluation never writes back a trigger that
 * was paused or removed meanwhile.
 */
export class TriggerEvaluator {
  private readonly turns = new Turns();
  private working: Promise<void> | undefined;
  private again = false;
  private stopped = false;
  private readonly parsed = new Map<string, MatchTerm[]>();

  constructor(private readonly deps: TriggerEvaluatorDeps) {}

  /** Runs `fn` alone among the writers of triggers (see the class comment). */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.turns.take(fn);
  }

  /** Evaluates every event not yet evaluated (those left by a stop too); resolves when none is left. */
  wake(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    if (this.working) {
      this.again = true;
      return this.working;
    }
    this.working = (async () => {
      do {
        this.again = false;
        for (const event of this.deps.store.unevaluated()) {
          if (this.stopped) return;
          try {
            await this.exclusive(() => this.evaluate(event));
          } catch (err) {
            // Left unevaluated: the next wake (a new event, or the next start) tries it again.
            this.deps.log.error("an event could not be evaluated", { host: event.hostId, event: event.eventId, err });
            return;
          }
        }
      } while (this.again && !this.stopped);
    })().finally(() => {
      this.working = undefined;
    });
    return this.working;
  }

  stop(): void {
    this.stopped = true;
  }

  private terms(on: string): MatchTerm[] {
    let t = this.parsed.get(on);
    if (!t) {
      if (this.parsed.size > 1000) this.parsed.clear();
      this.parsed.set(on, (t = parseMatch(on)));
    }
    return t;
  }

  private async evaluate(event: EventRecord): Promise<void> {
    const outcomes: EventOutcome[] = [];
    const changed: TriggerRecord[] = [];
    const firings: { name: string; hostId: string; firings: HostFirings }[] = [];
    const at = event.receivedAt;
    for (const rec of this.deps.store.triggers(event.tenant).sort((a, b) => a.name.localeCompare(b.name))) {
      if (!matches(this.terms(rec.on), event)) continue;
      // A trigger with its own hosts runs on all of them whoever reported: its cooldown and rate are the trigger's
      // as a whole (N hosts failing together queue one job, not N jobs on every host).
      const rateKey = rec.targeted ? TARGETED_RATE_KEY : event.hostId;
      const per = rec.targeted ? "for this trigger" : "for this host";
      const prior = this.deps.store.hostFirings(rec.tenant, rec.name, rateKey) ?? { times: [], lastJobId: "" };
      const inWindow = prior.times.filter((t) => at - t < rec.windowMs && t <= at);
      const last = prior.times.length > 0 ? Math.max(...prior.times) : undefined;
      let note = "";
      let jobId = "";
      if (rec.paused) note = "suppressed: the trigger is paused";
      else if (rec.cooldownMs > 0 && last !== undefined && at - last < rec.cooldownMs && at >= last) {
        note = `suppressed: cooldown (job ${prior.lastJobId} ${per} ${formatDuration(at - last)} before; cooldown ${formatDuration(rec.cooldownMs)})`;
      } else if (inWindow.length >= rec.maxPerHost) {
        note = `suppressed: rate limit (${inWindow.length} jobs ${per} within ${formatDuration(rec.windowMs)}; at most ${rec.maxPerHost})`;
      } else {
        try {
          jobId = await this.deps.fire(rec, event, firingKey(rec, event));
          firings.push({ name: rec.name, hostId: rateKey, firings: { times: [...inWindow, at].slice(-MAX_PER_HOST_LIMIT), lastJobId: jobId } });
          this.deps.log.info("trigger fired", { trigger: rec.name, tenant: rec.tenant, host: event.hostId, event: event.eventId, job: jobId });
        } catch (err) {
          // The controller is stopping: the event stays unevaluated and is evaluated again after the restart.
          if (codeOf(err) === Code.Unavailable) throw err;
          note = `refused: ${(err as Error).message}`;
          this.deps.log.warn("a trigger's firing was refused", { trigger: rec.name, tenant: rec.tenant, host: event.hostId, err });
        }
      }
      if (jobId) rec.fired++;
      else rec.suppressed++;
      remember(rec, { at, hostId: event.hostId, eventId: event.eventId, jobId, note });
      changed.push(rec);
      outcomes.push({ trigger: rec.name, jobId, note });
    }
    await this.deps.store.commitEvaluation({ ...event, outcomes }, changed, firings);
  }

  /** Pauses or resumes a trigger; NOT_FOUND once removed. */
  setPaused(tenant: string, name: string, paused: boolean): Promise<TriggerRecord> {
    return this.exclusive(async () => {
      const rec = this.deps.store.getTrigger(tenant, name);
      if (!rec) throw new NotFoundError(`no trigger ${JSON.stringify(name)}`);
      if (rec.paused === paused) return rec;
      rec.paused = paused;
      await this.deps.store.putTrigger(rec);
      return rec;
    });
  }
}

function remember(rec: TriggerRecord, f: TriggerFiring): void {
  rec.recent.push(f);
  if (rec.recent.length > RECENT_MAX) rec.recent.splice(0, rec.recent.length - RECENT_MAX);
}
