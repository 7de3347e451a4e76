import { create, fromBinary } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import type { PeerIdentity } from "../certs/identity.js";
import type { Logger } from "../common/logger.js";
import { toConnectError } from "../common/rpc-errors.js";
import { grantedPeer, respondsInBinary } from "../common/connect-server.js";
import {
  AuditDecision,
  AuditEventSchema,
  ConnectionState,
  DocumentSchema,
  PlannedTaskSchema,
  ControllerService,
  HostSchema,
  HostTaskSchema,
  JobSchema,
  QueueStage,
  SubmitJobRequestSchema,
  SubmitJobResponseSchema,
  SubmitAndWatchResponseSchema,
  SubmitJobResultSchema,
  type SubmitJobRequest,
  type SubmitJobResult,
  JobState,
  TaskStateCountSchema,
  WatchJobResponseSchema,
  type AuditEvent,
  type Document,
  type PlannedTask,
  type SessionRequest,
  RecordingState,
  SessionInfoSchema,
  type SessionInfo,
  type Host,
  type Job,
} from "../gen/rexmesh/v1/controller_pb.js";
import type { OperatorAccess } from "./access.js";
import type { AuditEvent as AuditRecord } from "./audit.js";
import type { JobManager, PlannedHost } from "./jobs.js";
import type { StoredDocument } from "./document-store.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { isTerminal } from "../common/task-state.js";
import { describeRequest } from "./access.js";
import { submitRequestOf } from "./planner.js";
import type { HostRecord, JobRecord, TaskRecord } from "./model.js";
import { watchJob } from "./watch.js";
import { taskToProto, watchResponse, type WatchFrame } from "./task-wire.js";
import { serveFrameLink } from "../common/connect-link.js";
import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import { formatIdentity } from "../certs/identity.js";
import type { ReleaseStore } from "./releases.js";
import { checkReleaseName } from "../common/release.js";
import { scheduleToProto, type Scheduler, type ScheduleRecord } from "./schedules.js";
import { truncate } from "../common/limits.js";
import type { ClientSessionLink, SessionBroker } from "./sessions.js";
import type { SessionSummary } from "./recordings.js";

/** A host for clients; `revoked` is why its identity is on the deny-list, if it is. */
function hostToProto(h: HostRecord, revoked?: string): Host {
  return create(HostSchema, {
    id: h.id,
    tenant: h.tenant,
    region: h.region,
    proxy: h.proxy,
    connection: revoked !== undefined ? ConnectionState.REVOKED : h.connected ? ConnectionState.CONNECTED : ConnectionState.DISCONNECTED,
    revokedReason: revoked ?? "",
    since: timestampFromMs(h.since),
    facts: h.facts,
    labels: h.labels,
  });
}

const DECISIONS = { allowed: AuditDecision.ALLOWED, denied: AuditDecision.DENIED, rejected: AuditDecision.REJECTED } as const;

function auditToProto(e: AuditRecord): AuditEvent {
  return create(AuditEventSchema, {
    id: e.id,
    time: timestampFromMs(e.time),
    kind: e.kind,
    tenant: e.tenant,
    actor: e.actor,
    decision: DECISIONS[e.decision] ?? AuditDecision.UNSPECIFIED,
    reason: e.reason,
    what: e.what,
    hostIds: e.hostIds,
    hostCount: e.hostCount,
    jobId: e.jobId,
  });
}

/** A job as the caller sees it: counts and task count over the tasks given (those it may read). */
const statesOf = (tasks: readonly TaskRecord[]): TaskState[] => tasks.map((t) => t.state);

/** A job with its tasks' counts per state (one state per task). */
function jobToProto(job: JobRecord, states: readonly TaskState[]): Job {
  const counts = new Map<number, number>();
  for (const state of states) counts.set(state, (counts.get(state) ?? 0) + 1);
  return create(JobSchema, {
    id: job.id,
    tenant: job.tenant,
    submittedBy: job.submittedBy,
    state: job.finishedAt !== undefined ? JobState.DONE : JobState.RUNNING,
    createdAt: timestampFromMs(job.createdAt),
    finishedAt: job.finishedAt !== undefined ? timestampFromMs(job.finishedAt) : undefined,
    steps: job.steps,
    counts: [...counts].sort((a, b) => a[0] - b[0]).map(([state, count]) => create(TaskStateCountSchema, { state, count })),
    taskCount: states.length,
    document: job.document ?? "",
    parameters: job.parameters ?? {},
    schedule: job.schedule ?? "",
  });
}


function documentToProto(d: StoredDocument): Document {
  return create(DocumentSchema, {
    name: d.name,
    version: d.version,
    description: d.description,
    createdAt: timestampFromMs(d.createdAt),
    createdBy: d.createdBy,
    content: d.content,
  });
}

function plannedToProto(p: PlannedHost): PlannedTask {
  return create(PlannedTaskSchema, {
    hostId: p.host.id,
    region: p.host.region,
    proxy: p.host.proxy,
    connected: p.host.connected,
    steps: p.steps,
    rejected: p.rejected ?? "",
  });
}

/** A job's command in a listing, at most: a listing of many must stay far below a message's size. */
const WHAT_CHARS = 500;

/** Where a task stands in its host's queue: not attempted yet, stored by the daemon, running, or ended. */
export function queueStage(state: TaskState): QueueStage {
  if (isTerminal(state)) return QueueStage.FINISHED;
  if (state === TaskState.RUNNING) return QueueStage.RUNNING;
  if (state === TaskState.DELIVERED) return QueueStage.DELIVERED;
  return QueueStage.QUEUED;
}

/**
 * The public ControllerService. Handlers only translate: the boundary
 * (common/connect-server.ts, controller/declarations.ts) admitted the
 * caller and its action and maps every error; scopes and the audit are in
 * OperatorAccess; the work is done by the job manager.
 */
export function controllerServiceImpl(deps: {
  jobs: JobManager;
  access: OperatorAccess;
  sessions?: SessionBroker;
  revoked?: (host: HostRecord) => string | undefined;
  scheduler?: Scheduler;
  releases?: ReleaseStore;
  now?: () => number;
  log?: Logger;
}): ServiceImpl<typeof ControllerService> {
  const scheduler = deps.scheduler;
  const shown = (rec: ScheduleRecord, withJob: boolean) =>
    scheduleToProto(rec, scheduler?.next(rec), truncate(describeRequest(submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request))), WHAT_CHARS), withJob);
  /** Session and Forward: one broker, each RPC for its own kind of session. */
  const serveSession = (requests: AsyncIterable<SessionRequest>, ctx: HandlerContext, kind: "session" | "forward") => {
    const sessions = deps.sessions;
    if (!sessions) throw new FailedPreconditionError("sessions are off at this controller: it serves them (and port forwards) when started with --sessions (read docs/sessions.md, Known gaps, first)");
    const caller = grantedPeer(ctx);
    return serveFrameLink(requests, ctx, (link: ClientSessionLink) => sessions.serveClient(link, caller, deps.access, ctx.signal, kind));
  };
  const { jobs, access } = deps;
  /** SubmitJob's work, for one job: a dry run's plan, or the job. */
  const submitOne = async (caller: PeerIdentity, req: SubmitJobRequest) => {
    const request = submitRequestOf(req);
    if (req.dryRun) return create(SubmitJobResponseSchema, { plan: (await access.dryRun(caller, request)).map(plannedToProto) });
    const job = await access.submit(caller, request);
    return create(SubmitJobResponseSchema, { job: jobToProto(job, statesOf(jobs.tasksOf(job))) });
  };
  /** WatchJob's stream: the tasks the caller may read, fixed when the watch starts; the rest (and their output) are never sent. */
  const streamJob = async function* (caller: PeerIdentity, jobId: string, noOutput: boolean, signal: AbortSignal) {
    const { job, tasks } = await access.getJob(caller, jobId, `watch job ${jobId}`);
    const shown = new Set(tasks.map((t) => t.id));
    // Each shown task's state as this stream last sent it. The job's counts come from here: by the last batch
    // every task has been sent in its final state, and reading every task's record again would read them all
    // from the store (a finished job's tasks are no longer held in memory).
    const states = new Map(tasks.map((t) => [t.id, t.state]));
    for await (const batch of watchJob(jobs, job, { noOutput, signal })) {
      const mine = batch.tasks.filter((t) => shown.has(t.id));
      for (const t of mine) states.set(t.id, t.state);
      yield {
        job: batch.job ? jobToProto(batch.job, [...states.values()]) : undefined,
        tasks: mine,
        output: batch.output.filter((c) => shown.has(c.taskId)),
      } satisfies WatchFrame;
    }
  };
  const releasesOf = () => {
    if (!deps.releases) throw new FailedPreconditionError("this controller keeps no releases");
    return deps.releases;
  };
  const host = (h: HostRecord) => hostToProto(h, deps.revoked?.(h));
  return {
    async listHosts(req, ctx) {
      return { hosts: (await access.listHosts(grantedPeer(ctx), req.target)).map(host) };
    },
    async setHostLabels(req, ctx) {
      return { host: host(await access.setLabels(grantedPeer(ctx), req.hostId, req.set, req.remove)) };
    },
    async listAudit(req, ctx) {
      const events = await access.listAudit(grantedPeer(ctx), { sinceMs: req.since ? timestampMs(req.since) : undefined, limit: req.limit });
      return { events: events.map(auditToProto) };
    },
    listSessions(req, ctx) {
      return { sessions: access.listSessions(grantedPeer(ctx), req.limit).map(sessionToProto) };
    },
    async *joinSession(req, ctx) {
      const sessions = deps.sessions;
      if (!sessions) throw new FailedPreconditionError("sessions are off at this controller");
      const caller = grantedPeer(ctx);
      const watch = await access.joinSession(caller, req.sessionId, () => sessions.observe(caller.scope, req.sessionId));
      const onAbort = () => watch.stop();
      ctx.signal.addEventListener("abort", onAbort, { once: true });
      try {
        const i = watch.info;
        yield { session: create(SessionInfoSchema, { sessionId: req.sessionId, operator: i.operator, hostId: i.hostId, proxy: i.proxy, kind: i.kind, what: i.what, startedAt: timestampFromMs(i.startedAt), recording: RecordingState.RECORDING }) };
        for await (const o of watch.output) yield { events: [{ atMs: BigInt(o.atMs), toHost: false, channel: o.channel, conn: o.conn, data: o.data }] };
        yield { ended: watch.ended() || "ended" };
      } finally {
        ctx.signal.removeEventListener("abort", onAbort);
        watch.stop();
      }
    },
    async *getSessionRecording(req, ctx) {
      const { summary, chunks } = await access.playSession(grantedPeer(ctx), req.sessionId);
      yield { session: sessionToProto(summary) };
      // One response per stored chunk (at most a few hundred KiB each), read lazily from the store.
      for (const events of chunks) {
        if (ctx.signal.aborted) return;
        yield { events: events.map(([atMs, toHost, channel, conn, data]) => ({ atMs: BigInt(atMs), toHost, channel, conn, data })) };
      }
    },
    async submitJob(req, ctx) {
      return submitOne(grantedPeer(ctx), req);
    },
    async submitJobs(req, ctx) {
      const caller = grantedPeer(ctx);
      // Each on its own: a job refused answers its code and message, as SubmitJob would have. They are planned,
      // checked and authorized in order (each call runs up to its first write before the next starts), and their
      // writes go together, so that LMDB commits the batch in a few transactions rather than one per job.
      const results: SubmitJobResult[] = await Promise.all(
        req.jobs.map(async (one) => {
          try {
            return create(SubmitJobResultSchema, { response: await submitOne(caller, one) });
          } catch (err) {
            const e = toConnectError(err);
            if (e.code === Code.Internal) deps.log?.error("a job of a SubmitJobs call failed", { err });
            return create(SubmitJobResultSchema, { code: e.code, message: e.rawMessage });
          }
        }),
      );
      return { results };
    },
    async *submitAndWatch(req, ctx) {
      if (!req.job) throw new InvalidArgumentError("SubmitAndWatch needs the job");
      if (req.job.dryRun) throw new InvalidArgumentError("SubmitAndWatch submits: a dry run is SubmitJob's");
      const caller = grantedPeer(ctx);
      const job = await access.submit(caller, submitRequestOf(req.job));
      const wire = respondsInBinary(ctx);
      for await (const frame of streamJob(caller, job.id, req.noOutput, ctx.signal)) yield watchResponse(SubmitAndWatchResponseSchema, frame, wire);
    },
    async getJob(req, ctx) {
      const { job, tasks } = await access.getJob(grantedPeer(ctx), req.jobId);
      return { job: jobToProto(job, statesOf(tasks)), tasks: tasks.map((t) => taskToProto(t, job.document ? jobs.shownSteps(t) : undefined)) };
    },
    async exportBundle(req, ctx) {
      return access.exportBundle(grantedPeer(ctx), req.region);
    },
    async importBundle(req, ctx) {
      const r = await access.importBundle(grantedPeer(ctx), req.bundle);
      return { statusesApplied: r.statuses, outputChunksApplied: r.chunks, hosts: r.hosts };
    },
    async putDocument(req, ctx) {
      const { stored, warnings } = await access.putDocument(grantedPeer(ctx), req.content);
      return { document: documentToProto(stored), warnings };
    },
    async getDocument(req, ctx) {
      return { document: documentToProto(await access.getDocument(grantedPeer(ctx), req.name)) };
    },
    async listDocuments(_req, ctx) {
      return { documents: (await access.listDocuments(grantedPeer(ctx))).map(documentToProto) };
    },
    async createSchedule(req, ctx) {
      if (!req.schedule) throw new InvalidArgumentError("CreateSchedule needs the schedule");
      const rec = await access.createSchedule(grantedPeer(ctx), req.schedule);
      return { schedule: shown(rec, true) };
    },
    async listSchedules(_req, ctx) {
      return { schedules: access.listSchedules(grantedPeer(ctx)).map((r) => shown(r, false)) };
    },
    async getSchedule(req, ctx) {
      return { schedule: shown(access.getSchedule(grantedPeer(ctx), req.name), true) };
    },
    async pauseSchedule(req, ctx) {
      return { schedule: shown(await access.pauseSchedule(grantedPeer(ctx), req.name, req.paused), true) };
    },
    async deleteSchedule(req, ctx) {
      await access.deleteSchedule(grantedPeer(ctx), req.name);
      return {};
    },
    async runSchedule(req, ctx) {
      return { jobId: await access.runSchedule(grantedPeer(ctx), req.name) };
    },
    async addRelease(req, ctx) {
      if (!req.release) throw new InvalidArgumentError("AddRelease needs the signed release (rexmesh release sign)");
      const caller = grantedPeer(ctx);
      return await releasesOf().add(caller.scope, formatIdentity(caller), req.release, (deps.now ?? Date.now)());
    },
    async listReleases(req, ctx) {
      const tenant = grantedPeer(ctx).scope;
      if (req.version) checkReleaseName("version", req.version);
      return { releases: req.version ? releasesOf().get(tenant, req.version) : releasesOf().list(tenant) };
    },
    async removeRelease(req, ctx) {
      if (!req.version) throw new InvalidArgumentError("RemoveRelease needs the version");
      checkReleaseName("version", req.version);
      if (req.platform) checkReleaseName("platform", req.platform);
      return { removed: await releasesOf().remove(grantedPeer(ctx).scope, req.version, req.platform) };
    },
    async listHostTasks(req, ctx) {
      const page = await access.listHostTasks(grantedPeer(ctx), req.hostId, req.pageSize, req.pageToken, req.unfinished);
      return {
        tasks: page.tasks.map(({ task, job }) =>
          create(HostTaskSchema, {
            task: taskToProto(task),
            stage: queueStage(task.state),
            what: job ? truncate(job.document ? `document ${job.document}` : describeRequest({ steps: job.steps }), WHAT_CHARS) : "",
            submittedBy: job?.submittedBy ?? "",
            createdAt: job && timestampFromMs(job.createdAt),
          }),
        ),
        nextPageToken: page.next,
      };
    },
    async listJobs(req, ctx) {
      return { jobs: (await access.listJobs(grantedPeer(ctx), req.limit)).map(({ job, tasks }) => jobToProto(job, statesOf(tasks))) };
    },
    async rerunJob(req, ctx) {
      const job = await access.rerun(grantedPeer(ctx), req.jobId, { states: req.states, hostIds: req.hostIds }, req.idempotencyKey);
      return { job: jobToProto(job, statesOf(jobs.tasksOf(job))) };
    },
    async cancelJob(req, ctx) {
      const job = await access.cancel(grantedPeer(ctx), req.jobId, req.hostIds);
      return { job: jobToProto(job, statesOf(jobs.tasksOf(job))) };
    },
    session(requests, ctx) {
      return serveSession(requests, ctx, "session");
    },
    forward(requests, ctx) {
      return serveSession(requests, ctx, "forward");
    },
    async *watchJob(req, ctx) {
      const wire = respondsInBinary(ctx);
      for await (const frame of streamJob(grantedPeer(ctx), req.jobId, req.noOutput, ctx.signal)) yield watchResponse(WatchJobResponseSchema, frame, wire);
    },
  };
}

const RECORDING_STATES = { recording: RecordingState.RECORDING, complete: RecordingState.COMPLETE, cut: RecordingState.CUT, failed: RecordingState.FAILED } as const;

function sessionToProto(s: SessionSummary): SessionInfo {
  return create(SessionInfoSchema, {
    sessionId: s.id,
    operator: s.operator,
    hostId: s.hostId,
    proxy: s.proxy,
    kind: s.kind,
    what: s.what,
    startedAt: timestampFromMs(s.startedAt),
    endedAt: s.endedAt === undefined ? undefined : timestampFromMs(s.endedAt),
    bytesToHost: BigInt(s.bytesToHost),
    bytesFromHost: BigInt(s.bytesFromHost),
    outcome: s.outcome,
    recording: RECORDING_STATES[s.recording],
  });
}
