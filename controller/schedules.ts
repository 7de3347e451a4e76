/**
 * Schedules (docs/schedules.md): a job submitted again and again by a cron
 * expression in a time zone, each firing an ordinary job of the operator
 * who created the schedule (authorized and audited as its submit, at the
 * time it fires), linked to its schedule.
 *
 * The rules a schedule keeps, whatever the clock does:
 * - Time zones and daylight saving: firings are the times the expression
 *   names in its zone, as `croner` computes them: a wall-clock time that
 *   does not exist (the hour skipped in spring) fires at the first minute
 *   after the gap; one that occurs twice (the hour repeated in autumn)
 *   fires once, the first time; an expression every minute or hour fires
 *   every real minute or hour through both. Never twice, never skipped.
 * - Misfire: a firing is on time when it runs within `graceMs` of its time.
 *   Those missed by more (the controller was down) are skipped (`skip`),
 *   run once for all of them (`once`, the latest), or each run (`all`, the
 *   latest {@link CATCH_UP_MAX}). A firing handled is never handled again.
 * - Overlap: when the previous firing's job still runs, the next one runs
 *   anyway (`allow`), is skipped (`skip`), or waits for it to end
 *   (`queue`, at most {@link QUEUE_MAX} waiting).
 * - Exactly once: each firing is submitted with an idempotency key made of
 *   the schedule and the firing's time, and only then is the firing
 *   recorded as done: a controller that dies between the two submits it
 *   again after its restart and gets the same job back.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Cron } from "croner";
import { Turns } from "./exclusive.js";
import { formatIdentity } from "../certs/identity.js";
import { Misfire as MisfireProto, Overlap as OverlapProto, ScheduleFiringSchema, ScheduleSchema, SubmitJobRequestSchema, type Schedule, type ScheduleSpec, type SubmitJobRequest } from "../gen/rexmesh/v1/controller_pb.js";
import type { Database } from "lmdb";
import type { PeerIdentity } from "../certs/identity.js";
import type { Clock, Timer } from "../common/clock.js";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import { Code } from "@connectrpc/connect";
import { codeOf } from "../common/rpc-errors.js";
import type { LmdbEnv } from "../common/lmdb.js";
import type { Logger } from "../common/logger.js";

export type Misfire = "skip" | "once" | "all";
export type Overlap = "allow" | "skip" | "queue";

/** A firing, as `schedules show` lists the latest. */
export interface Firing {
  /** When it was due. */
  at: number;
  jobId: string;
  /** Why it did not submit a job (refused, skipped for overlap or misfire), else empty. */
  note: string;
}

export interface ScheduleRecord {
  tenant: string;
  name: string;
  cron: string;
  timezone: string;
  paused: boolean;
  misfire: Misfire;
  graceMs: number;
  overlap: Overlap;
  /** The job each firing submits: a SubmitJobRequest in protobuf binary. */
  request: Uint8Array;
  /** Who created it: each firing is this operator's submit. */
  creator: PeerIdentity;
  createdAt: number;
  /** The time of the last firing handled (run, skipped or missed): those after it are due. */
  lastAt: number;
  /** The job of the last firing that ran. */
  lastJobId: string;
  /** Times of firings waiting for the previous job to end (overlap `queue`). */
  queued: number[];
  fired: number;
  skipped: number;
  missed: number;
  /** The latest firings, newest last, at most {@link RECENT_MAX}. */
  recent: Firing[];
  /** Wall-clock times fired near a daylight-saving change, so that a repeated hour does not fire them again. */
  walls?: { wall: string; at: number }[];
}

/** The idempotency keys of firings begin so; an operator's submit may not use it (controller/access.ts). */
export const SCHEDULE_KEY_PREFIX = "schedule:";

/** Missed firings run at most, one after another, with misfire `all`. */
export const CATCH_UP_MAX = 100;
/** Firings waiting at most, with overlap `queue`; more are skipped. */
export const QUEUE_MAX = 10;
const RECENT_MAX = 20;
/** A last firing this far past the clock means the clock was ahead and was set back. */
const CLOCK_SLACK_MS = 60_000;
/** The scheduler looks again at least this often, whatever its timer said (a clock set back, a job ended). */
const RECHECK_MS = 60_000;
/** While a firing waits for the previous job to end, it looks this often. */
const QUEUE_RECHECK_MS = 1_000;

export interface ScheduleStore {
  all(): ScheduleRecord[];
  /** Every schedule's tenant and name, without reading the records. */
  names(): { tenant: string; name: string }[];
  get(tenant: string, name: string): ScheduleRecord | undefined;
  put(rec: ScheduleRecord): Promise<void>;
  remove(tenant: string, name: string): Promise<void>;
}

export class MemoryScheduleStore implements ScheduleStore {
  private readonly recs = new Map<string, ScheduleRecord>();
  all(): ScheduleRecord[] {
    return [...this.recs.values()].map(clone);
  }
  names(): { tenant: string; name: string }[] {
    return [...this.recs.values()].map((r) => ({ tenant: r.tenant, name: r.name }));
  }
  get(tenant: string, name: string): ScheduleRecord | undefined {
    const r = this.recs.get(`${tenant}\0${name}`);
    return r && clone(r);
  }
  async put(rec: ScheduleRecord): Promise<void> {
    this.recs.set(`${rec.tenant}\0${rec.name}`, clone(rec));
  }
  async remove(tenant: string, name: string): Promise<void> {
    this.recs.delete(`${tenant}\0${name}`);
  }
}

export class LmdbScheduleStore implements ScheduleStore {
  private readonly db: Database<ScheduleRecord, string[]>;
  constructor(env: LmdbEnv) {
    this.db = env.db("schedules");
  }
  all(): ScheduleRecord[] {
    return [...this.db.getRange({}).map(({ value }) => value)];
  }
  names(): { tenant: string; name: string }[] {
    return [...this.db.getKeys({}).map(([tenant, name]) => ({ tenant: tenant!, name: name! }))];
  }
  get(tenant: string, name: string): ScheduleRecord | undefined {
    return this.db.get([tenant, name]);
  }
  async put(rec: ScheduleRecord): Promise<void> {
    await this.db.put([rec.tenant, rec.name], rec);
  }
  async remove(tenant: string, name: string): Promise<void> {
    await this.db.remove([tenant, name]);
  }
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const REDACTED = "<redacted>";
/** How late a firing may run as on time, by default; and the longest a schedule may say. */
const GRACE_DEFAULT_MS = 60_000;
const GRACE_MAX_MS = 7 * 24 * 3600_000;

const MISFIRES: Record<MisfireProto, Misfire> = { [MisfireProto.UNSPECIFIED]: "once", [MisfireProto.SKIP]: "skip", [MisfireProto.ONCE]: "once", [MisfireProto.ALL]: "all" };
const OVERLAPS: Record<OverlapProto, Overlap> = { [OverlapProto.UNSPECIFIED]: "skip", [OverlapProto.ALLOW]: "allow", [OverlapProto.SKIP]: "skip", [OverlapProto.QUEUE]: "queue" };
const MISFIRE_PROTO: Record<Misfire, MisfireProto> = { skip: MisfireProto.SKIP, once: MisfireProto.ONCE, all: MisfireProto.ALL };
const OVERLAP_PROTO: Record<Overlap, OverlapProto> = { allow: OverlapProto.ALLOW, skip: OverlapProto.SKIP, queue: OverlapProto.QUEUE };

/**
 * A new schedule of `creator` from what the API was given: a name, an
 * expression that parses in its zone and fires at most once a second, a
 * grace window of 1 s to 7 days, and a job (neither a dry run nor an
 * idempotency key: each firing has its own). INVALID_ARGUMENT naming what
 * is wrong.
 */
export function newSchedule(creator: PeerIdentity, spec: ScheduleSpec, now: number): ScheduleRecord {
  if (!NAME.test(spec.name)) throw new InvalidArgumentError(`schedule name ${JSON.stringify(spec.name.slice(0, 80))} is not 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)`);
  const timezone = spec.timezone || "UTC";
  const cron = cronOf(spec.cron, timezone);
  const first = nextFiring(cron, now);
  if (first === undefined) throw new InvalidArgumentError(`cron expression ${JSON.stringify(spec.cron)} names no time from now on`);
  const second = nextFiring(cron, first);
  if (second !== undefined && second - first < 1000) throw new InvalidArgumentError(`cron expression ${JSON.stringify(spec.cron)} fires more than once a second`);
  if (!spec.job) throw new InvalidArgumentError("a schedule needs the job each firing submits (job)");
  if (spec.job.dryRun) throw new InvalidArgumentError("a schedule's job cannot be a dry run");
  if (spec.job.idempotencyKey) throw new InvalidArgumentError("a schedule's job takes no idempotency key: each firing has its own");
  const graceMs = spec.misfireGrace ? durationMs(spec.misfireGrace) : GRACE_DEFAULT_MS;
  if (graceMs < 1000 || graceMs > GRACE_MAX_MS) throw new InvalidArgumentError("misfire_grace must be from 1 s to 7 days");
  const request = toBinary(SubmitJobRequestSchema, spec.job);
  if (request.length > LIMITS.scheduleJobBytes) throw new InvalidArgumentError(`a schedule's job is ${request.length} bytes; at most ${LIMITS.scheduleJobBytes} (put a large stdin or script in an artifact)`);
  return {
    tenant: creator.scope,
    name: spec.name,
    cron: spec.cron,
    timezone,
    paused: false,
    misfire: MISFIRES[spec.misfire] ?? "once",
    graceMs,
    overlap: OVERLAPS[spec.overlap] ?? "skip",
    request,
    creator: { ...creator },
    createdAt: now,
    lastAt: now,
    lastJobId: "",
    queued: [],
    fired: 0,
    skipped: 0,
    missed: 0,
    recent: [],
  };
}

/**
 * A schedule as the API shows it; `next`: its next firing, if any; `what`:
 * its job in words. With `withJob`, the job too, with the values of its
 * environment, its parameters and its stdin left out (they may be secrets,
 * as a job's are never shown either).
 */
export function scheduleToProto(rec: ScheduleRecord, next: number | undefined, what: string, withJob: boolean): Schedule {
  const job = withJob ? shownJob(rec.request) : undefined;
  return create(ScheduleSchema, {
    spec: {
      name: rec.name,
      cron: rec.cron,
      timezone: rec.timezone,
      misfire: MISFIRE_PROTO[rec.misfire],
      misfireGrace: { seconds: BigInt(Math.floor(rec.graceMs / 1000)), nanos: (rec.graceMs % 1000) * 1e6 },
      overlap: OVERLAP_PROTO[rec.overlap],
      job,
    },
    createdBy: formatIdentity(rec.creator),
    createdAt: timestampFromMs(rec.createdAt),
    paused: rec.paused,
    nextRun: next === undefined ? undefined : timestampFromMs(next),
    lastJobId: rec.lastJobId,
    fired: BigInt(rec.fired),
    skipped: BigInt(rec.skipped),
    missed: BigInt(rec.missed),
    queued: rec.queued.length,
    recent: rec.recent.map((f) => create(ScheduleFiringSchema, { at: timestampFromMs(f.at), jobId: f.jobId, note: f.note })),
    what,
  });
}

/**
 * A standing job (a schedule's, a trigger's) as the API shows it: the
 * values of its environment, its parameters and its stdin left out (they
 * may be secrets, as a job's are never shown either).
 */
export function shownJob(request: Uint8Array): SubmitJobRequest {
  const job = fromBinary(SubmitJobRequestSchema, request);
  for (const k of Object.keys(job.env)) job.env[k] = REDACTED;
  for (const k of Object.keys(job.parameters)) job.parameters[k] = REDACTED;
  job.stdin = new Uint8Array();
  return job;
}

function clone(r: ScheduleRecord): ScheduleRecord {
  return { ...r, queued: [...r.queued], recent: r.recent.map((f) => ({ ...f })), creator: { ...r.creator }, ...(r.walls ? { walls: r.walls.map((w) => ({ ...w })) } : {}) };
}

/** The cron expression in its zone; INVALID_ARGUMENT naming what is wrong. Seconds are allowed (six fields), at most one firing a second. */
export function cronOf(expr: string, timezone: string): Cron {
  try {
    new Intl.DateTimeFormat("en", { timeZone: timezone });
  } catch {
    throw new InvalidArgumentError(`time zone ${JSON.stringify(timezone)} is not one this controller knows (an IANA name such as Europe/Berlin, or UTC)`);
  }
  let cron: Cron;
  try {
    cron = new Cron(expr, { timezone, paused: true });
  } catch (err) {
    throw new InvalidArgumentError(`cron expression ${JSON.stringify(expr)}: ${(err as Error).message}`);
  }
  return cron;
}

/** The first firing strictly after `after` (epoch ms), or undefined when the expression names no more. */
export function nextFiring(cron: Cron, after: number): number | undefined {
  const next = cron.nextRun(new Date(after));
  return next ? next.getTime() : undefined;
}

export interface SchedulerDeps {
  clock: Clock;
  store: ScheduleStore;
  log: Logger;
  /**
   * Submits one firing as the schedule's creator (or `by`, for a run-now
   * by another operator), under the idempotency `key`; resolves with the
   * job id, rejects with why it was refused.
   */
  fire(rec: ScheduleRecord, at: number, key: string, by?: PeerIdentity): Promise<string>;
  /** Whether a job has not ended yet. */
  running(jobId: string): boolean;
}

/**
 * Runs every schedule of the store: on each wake it handles the firings
 * due since each schedule's last one, then sleeps until the next.
 */
export class Scheduler {
  private timer: Timer | undefined;
  private working: Promise<void> | undefined;
  private again = false;
  private stopped = false;
  private readonly crons = new Map<string, Cron>();
  private readonly zones = new Map<string, WallZone>();
  /** The one writer of schedule records at a time (see exclusive). */
  private readonly turns = new Turns();

  constructor(private readonly deps: SchedulerDeps) {}

  /**
   * Runs `fn` alone among the writers of schedule records: the scheduler's
   * handling of one schedule's firings, and an operator's add, pause,
   * resume, run-now or removal. Each reads the record fresh inside, so
   * none writes back a copy another changed meanwhile (a pause lost to a
   * firing that was being submitted, a removed schedule put back).
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.turns.take(fn);
  }

  start(): void {
    this.wake().catch((err: unknown) => this.deps.log.error("the scheduler failed", { err }));
  }

  stop(): void {
    this.stopped = true;
    this.timer?.cancel();
  }

  /** Looks at every schedule now (and again at once if already looking). Resolves when done. */
  wake(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    if (this.working) {
      this.again = true;
      return this.working;
    }
    this.timer?.cancel();
    // When to look again: the soonest next firing of the records as handled (each read once per pass).
    let soonest = Infinity;
    this.working = (async () => {
      do {
        this.again = false;
        soonest = this.deps.clock.now() + RECHECK_MS;
        for (const { tenant, name } of this.deps.store.names()) {
          try {
            await this.exclusive(async () => {
              const rec = this.deps.store.get(tenant, name);
              if (!rec) return;
              await this.handle(rec);
              soonest = Math.min(soonest, this.wakeFor(rec));
            });
          } catch (err) {
            this.deps.log.error("a schedule could not be handled", { schedule: name, tenant, err });
          }
        }
      } while (this.again && !this.stopped);
    })().finally(() => {
      this.working = undefined;
      this.arm(soonest);
    });
    return this.working;
  }

  /** The next firing of a schedule after now (for listings). */
  next(rec: ScheduleRecord): number | undefined {
    if (rec.paused) return undefined;
    return nextFiring(this.cron(rec), Math.max(rec.lastAt, this.deps.clock.now()));
  }

  /**
   * Pauses or resumes a schedule. Paused, it fires nothing: firings waiting
   * for the previous job are dropped (counted skipped). Resumed, it goes on
   * from now: what would have fired while it was paused never does.
   */
  setPaused(tenant: string, name: string, paused: boolean): Promise<ScheduleRecord> {
    return this.exclusive(async () => {
      const rec = this.deps.store.get(tenant, name);
      if (!rec) throw new NotFoundError(`no schedule ${JSON.stringify(name)}`);
      if (rec.paused === paused) return rec;
      rec.paused = paused;
      if (paused) {
        rec.skipped += rec.queued.length;
        rec.queued = [];
      } else rec.lastAt = Math.max(rec.lastAt, this.deps.clock.now());
      await this.deps.store.put(rec);
      return rec;
    });
  }

  /** Submits a firing now, outside the expression (run-now); overlap does not apply. NOT_FOUND once removed. */
  runNow(tenant: string, name: string, by?: PeerIdentity): Promise<string> {
    return this.exclusive(async () => {
      const rec = this.deps.store.get(tenant, name);
      if (!rec) throw new NotFoundError(`no schedule ${JSON.stringify(name)}`);
      const at = this.deps.clock.now();
      const jobId = await this.deps.fire(rec, at, `${SCHEDULE_KEY_PREFIX}${rec.name}:${rec.createdAt}:now:${at}`, by);
      rec.lastJobId = jobId;
      rec.fired++;
      remember(rec, { at, jobId, note: by ? `run now by ${formatIdentity(by)}` : "run now" });
      await this.deps.store.put(rec);
      return jobId;
    });
  }

  private cron(rec: ScheduleRecord): Cron {
    const key = `${rec.cron}\0${rec.timezone}`;
    let c = this.crons.get(key);
    if (!c) this.crons.set(key, (c = cronOf(rec.cron, rec.timezone)));
    return c;
  }

  /** When a schedule wants looking at again: its next firing, or soon while a firing waits for the previous job. */
  private wakeFor(rec: ScheduleRecord): number {
    if (rec.paused) return Infinity;
    const now = this.deps.clock.now();
    const next = nextFiring(this.cron(rec), Math.max(rec.lastAt, now - 1)) ?? Infinity;
    return rec.queued.length > 0 ? Math.min(next, now + QUEUE_RECHECK_MS) : next;
  }

  private arm(soonest: number): void {
    if (this.stopped) return;
    const now = this.deps.clock.now();
    this.timer = this.deps.clock.setTimeout(() => this.start(), Math.max(0, Math.min(soonest, now + RECHECK_MS) - now));
  }

  /** The firings due for one schedule: run, skipped or missed as its policies say; then stored. */
  private async handle(rec: ScheduleRecord): Promise<void> {
    if (rec.paused) return;
    const now = this.deps.clock.now();
    const cron = this.cron(rec);
    let changed = false;
    // A firing waiting for the previous job: it goes once that job has ended.
    if (rec.queued.length > 0 && !this.deps.running(rec.lastJobId)) {
      const at = rec.queued.shift()!;
      await this.fire(rec, at, "queued behind the previous firing");
      changed = true;
    }
    // A clock that was ahead (and fired what is not due yet) set back: the schedule goes on from now, with a note.
    if (rec.lastAt > now + CLOCK_SLACK_MS) {
      remember(rec, { at: now, jobId: "", note: `the clock went back (the last firing handled is at ${new Date(rec.lastAt).toISOString()}): going on from now` });
      rec.lastAt = now;
      await this.deps.store.put(rec);
      return;
    }
    // The latest firings due, computed backwards from now: a schedule far behind costs no more than one that is not.
    const latest = cron
      .previousRuns(CATCH_UP_MAX + 1, new Date(now + 1))
      .map((d) => d.getTime())
      .filter((t) => t > rec.lastAt)
      .reverse();
    const gap = this.gapFiring(rec, now);
    if (gap !== undefined && !latest.includes(gap)) {
      latest.push(gap);
      latest.sort((a, b) => a - b);
    }
    if (latest.length === 0) {
      if (changed) await this.deps.store.put(rec);
      return;
    }
    // More were due before those, all missed (their number is not counted: at least one).
    const older = latest.length === CATCH_UP_MAX + 1 && (nextFiring(cron, rec.lastAt) ?? Infinity) < latest[0]!;
    const handledUpTo = latest[latest.length - 1]!;
    const due = this.keepWallTimes(rec, older ? latest.slice(1) : latest, now);
    const onTime = due.filter((t) => now - t <= rec.graceMs);
    const missed = due.filter((t) => now - t > rec.graceMs);
    let run: number[] = [];
    if (rec.misfire === "all") run = missed;
    else if (rec.misfire === "once" && missed.length > 0 && onTime.length === 0) run = [missed[missed.length - 1]!];
    const dropped = missed.length - run.length + (older ? 1 : 0);
    if (dropped > 0) {
      rec.missed += dropped;
      remember(rec, { at: missed[0] ?? due[0]!, jobId: "", note: `missed ${older ? "at least " : ""}${dropped} firing(s) while the controller was away (misfire ${rec.misfire})` });
      this.deps.log.warn("schedule firings missed", { schedule: rec.name, tenant: rec.tenant, missed: dropped, misfire: rec.misfire });
    }
    for (const at of [...run, ...onTime]) {
      if (rec.lastJobId && this.deps.running(rec.lastJobId) && rec.overlap !== "allow") {
        if (rec.overlap === "queue" && rec.queued.length < QUEUE_MAX) rec.queued.push(at);
        else {
          rec.skipped++;
          remember(rec, { at, jobId: "", note: `skipped: job ${rec.lastJobId} of the previous firing still runs (overlap ${rec.overlap})` });
        }
        continue;
      }
      await this.fire(rec, at, "");
    }
    // Never back: a firing handled is never handled again.
    rec.lastAt = Math.max(rec.lastAt, handledUpTo);
    await this.deps.store.put(rec);
  }

  /**
   * Daylight saving, for an expression that names hours (not `*`): the
   * wall-clock times it fires are kept a few hours around a change, and a
   * time the repeated autumn hour brings again is dropped — each wall time
   * fires once. (An expression every hour or every minute follows real
   * time instead, as croner does.)
   */
  private keepWallTimes(rec: ScheduleRecord, due: number[], now: number): number[] {
    if (!namesHours(rec.cron)) return due;
    const zone = this.zone(rec.timezone);
    const walls = (rec.walls ?? []).filter((w) => now - w.at < WALL_KEEP_MS);
    const kept: number[] = [];
    for (const t of due) {
      if (zone.offset(t - WALL_KEEP_MS / 2) === zone.offset(t + WALL_KEEP_MS / 2)) {
        kept.push(t);
        continue;
      }
      const wall = zone.wall(t);
      if (walls.some((w) => w.wall === wall)) {
        remember(rec, { at: t, jobId: "", note: `not again: ${wall} ${rec.timezone} fired before this hour repeated (daylight saving)` });
        continue;
      }
      walls.push({ wall, at: t });
      kept.push(t);
    }
    rec.walls = walls;
    return kept;
  }

  /**
   * Daylight saving, the spring change: wall-clock times in the skipped
   * hour do not exist, and croner names none of them for an expression
   * such as `*\/15 2 * * *`. If the expression names any, the schedule
   * fires once at the change itself — the first minute after the gap —
   * for all of them. Looked for in the last two days only (changes are
   * months apart).
   */
  private gapFiring(rec: ScheduleRecord, now: number): number | undefined {
    if (!namesHours(rec.cron)) return undefined;
    const zone = this.zone(rec.timezone);
    const from = Math.max(rec.lastAt, now - 2 * 24 * 3600_000);
    const before = zone.offset(from);
    const after = zone.offset(now);
    if (after <= before) return undefined;
    // The change: the first minute with the new offset.
    let lo = from;
    let hi = now;
    while (hi - lo > 60_000) {
      const mid = lo + Math.floor((hi - lo) / 2);
      if (zone.offset(mid) === after) hi = mid;
      else lo = mid;
    }
    const change = Math.ceil(hi / 60_000) * 60_000;
    if (change <= rec.lastAt || change > now) return undefined;
    const fixed = new Cron(rec.cron, { utcOffset: before, paused: true });
    const wanted = fixed.nextRun(new Date(change - 1));
    return wanted && wanted.getTime() < change + (after - before) * 60_000 ? change : undefined;
  }

  private zone(name: string): WallZone {
    let z = this.zones.get(name);
    if (!z) this.zones.set(name, (z = new WallZone(name)));
    return z;
  }

  private async fire(rec: ScheduleRecord, at: number, note: string): Promise<void> {
    try {
      const jobId = await this.deps.fire(rec, at, `${SCHEDULE_KEY_PREFIX}${rec.name}:${rec.createdAt}:${at}`);
      rec.lastJobId = jobId;
      rec.fired++;
      remember(rec, { at, jobId, note });
      this.deps.log.info("schedule fired", { schedule: rec.name, tenant: rec.tenant, job: jobId, at: new Date(at).toISOString() });
    } catch (err) {
      // The controller is stopping: the firing is not handled now (nothing is recorded), and after the restart it is
      // due again, under the same key, or a misfire by the schedule's policy.
      if (codeOf(err) === Code.Unavailable) throw err;
      rec.skipped++;
      remember(rec, { at, jobId: "", note: `refused: ${(err as Error).message}` });
      this.deps.log.warn("a schedule's firing was refused", { schedule: rec.name, tenant: rec.tenant, err });
    }
  }
}

/** How long around a daylight-saving change the wall-clock times fired are kept. */
const WALL_KEEP_MS = 6 * 3600_000;

/** Whether an expression names the hours it fires in (its hour field is not `*`): its times are wall-clock times. */
function namesHours(expr: string): boolean {
  const fields = expr.trim().split(/\s+/);
  const hour = fields.length >= 6 ? fields[2] : fields[1];
  return hour !== "*" && hour !== "*/1";
}

/** A time zone's offset and wall-clock time at an instant. */
class WallZone {
  private readonly offsets: Intl.DateTimeFormat;
  private readonly walls: Intl.DateTimeFormat;
  constructor(zone: string) {
    this.offsets = new Intl.DateTimeFormat("en-US", { timeZone: zone, timeZoneName: "longOffset" });
    this.walls = new Intl.DateTimeFormat("sv-SE", { timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  }

  /** Minutes east of UTC. */
  offset(t: number): number {
    const name = this.offsets.formatToParts(new Date(t)).find((p) => p.type === "timeZoneName")?.value ?? "GMT";
    const m = /GMT([+-])(\d\d):(\d\d)/.exec(name);
    return m ? (m[1] === "-" ? -1 : 1) * (Number(m[2]) * 60 + Number(m[3])) : 0;
  }

  wall(t: number): string {
    return this.walls.format(new Date(t));
  }
}

function remember(rec: ScheduleRecord, f: Firing): void {
  rec.recent.push(f);
  if (rec.recent.length > RECENT_MAX) rec.recent.splice(0, rec.recent.length - RECENT_MAX);
}
