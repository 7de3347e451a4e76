import { create } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { requireRole, type PeerIdentity } from "../certs/identity.js";
import type { Logger } from "../common/logger.js";
import { toConnectError } from "../common/rpc-errors.js";
import {
  AuditDecision,
  AuditEventSchema,
  ConnectionState,
  DocumentSchema,
  PlannedTaskSchema,
  ControllerService,
  HostSchema,
  JobSchema,
  JobState,
  LateReportSchema,
  TaskSchema,
  TaskStateCountSchema,
  WatchJobResponseSchema,
  type AuditEvent,
  type Document,
  type PlannedTask,
  type Host,
  type Job,
  type Task,
} from "../gen/rexmesh/v1/controller_pb.js";
import type { OperatorAccess } from "./access.js";
import type { AuditEvent as AuditRecord } from "./audit.js";
import type { BundleService } from "./bundles.js";
import type { Inventory } from "./inventory.js";
import { outputComplete, type JobManager, type PlannedHost } from "./jobs.js";
import type { StoredDocument } from "./document-store.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import type { HostRecord, JobRecord, TaskRecord } from "./model.js";
import { watchJob } from "./watch.js";

/** How a handler learns who is calling; set from the TLS peer certificate. */
export type CallerOf = (context: HandlerContext) => PeerIdentity;

/** A host for clients; `revoked` is why its identity is on the deny-list, if it is. */
export function hostToProto(h: HostRecord, revoked?: string): Host {
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

export function auditToProto(e: AuditRecord): AuditEvent {
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

export function jobToProto(job: JobRecord, tasks: readonly TaskRecord[]): Job {
  const counts = new Map<number, number>();
  for (const t of tasks) counts.set(t.state, (counts.get(t.state) ?? 0) + 1);
  return create(JobSchema, {
    id: job.id,
    tenant: job.tenant,
    submittedBy: job.submittedBy,
    state: job.finishedAt !== undefined ? JobState.DONE : JobState.RUNNING,
    createdAt: timestampFromMs(job.createdAt),
    finishedAt: job.finishedAt !== undefined ? timestampFromMs(job.finishedAt) : undefined,
    steps: job.steps,
    counts: [...counts].sort((a, b) => a[0] - b[0]).map(([state, count]) => create(TaskStateCountSchema, { state, count })),
    taskCount: job.taskIds.length,
    document: job.document ?? "",
    parameters: job.parameters ?? {},
  });
}

export function documentToProto(d: StoredDocument): Document {
  return create(DocumentSchema, {
    name: d.name,
    version: d.version,
    description: d.description,
    createdAt: timestampFromMs(d.createdAt),
    createdBy: d.createdBy,
    content: d.content,
  });
}

export function plannedToProto(p: PlannedHost): PlannedTask {
  return create(PlannedTaskSchema, {
    hostId: p.host.id,
    region: p.host.region,
    proxy: p.host.proxy,
    connected: p.host.connected,
    steps: p.steps,
    rejected: p.rejected ?? "",
  });
}

/** A task for clients; `steps` (a document run's redacted steps for the host) only where asked. */
export function taskToProto(t: TaskRecord, steps?: Step[]): Task {
  return create(TaskSchema, {
    id: t.id,
    jobId: t.jobId,
    hostId: t.hostId,
    region: t.region,
    proxy: t.proxy,
    state: t.state,
    exitCode: t.exitCode,
    signal: t.signal,
    message: t.message,
    updatedAt: timestampFromMs(t.updatedAt),
    outputTruncated: t.outputTruncated,
    outputChunks: BigInt(t.outputChunks),
    steps: steps ?? [],
    outputChunksExpected: BigInt(t.expectedChunks ?? 0),
    outputComplete: outputComplete(t),
    lateReport: t.late && create(LateReportSchema, { state: t.late.state, exitCode: t.late.exitCode, signal: t.late.signal, message: t.late.message, time: timestampFromMs(t.late.time) }),
  });
}

/**
 * The public ControllerService. Handlers only translate: the caller comes
 * from the certificate (operators only), authorization and audit happen in
 * OperatorAccess, the work is done by the job manager, and every error
 * leaves through toConnectError.
 */
export function controllerServiceImpl(deps: { jobs: JobManager; inventory?: Inventory; bundles: BundleService; access: OperatorAccess; callerOf: CallerOf; log: Logger; revoked?: (host: HostRecord) => string | undefined }): ServiceImpl<typeof ControllerService> {
  const { jobs, bundles, access, log } = deps;
  const operator = (ctx: HandlerContext) => requireRole(deps.callerOf(ctx), "operator");
  const guard = async <T>(method: string, fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      const wire = toConnectError(err);
      log[wire.code === 13 ? "error" : "info"]("request refused", { method, code: wire.code, err });
      throw wire;
    }
  };
  return {
    listHosts: (req, ctx) =>
      guard("ListHosts", async () => {
        const hosts = await access.listHosts(operator(ctx), req.target);
        return { hosts: hosts.map((h) => hostToProto(h, deps.revoked?.(h))) };
      }),
    setHostLabels: (req, ctx) =>
      guard("SetHostLabels", async () => {
        const host = await access.setLabels(operator(ctx), req.hostId, req.set, req.remove);
        return { host: hostToProto(host, deps.revoked?.(host)) };
      }),
    listAudit: (req, ctx) =>
      guard("ListAudit", async () => {
        const events = await access.listAudit(operator(ctx), { sinceMs: req.since ? timestampMs(req.since) : undefined, limit: req.limit });
        return { events: events.map(auditToProto) };
      }),
    submitJob: (req, ctx) =>
      guard("SubmitJob", async () => {
        const caller = operator(ctx);
        const request = {
          hostIds: req.hostIds,
          allHosts: req.allHosts,
          target: req.target,
          steps: req.steps,
          env: req.env,
          workingDir: req.workingDir,
          stdin: req.stdin,
          timeoutMs: req.timeout ? durationMs(req.timeout) : 0,
          deliveryDeadlineMs: req.deliveryDeadline ? durationMs(req.deliveryDeadline) : 0,
          lostAfterMs: req.lostAfter ? durationMs(req.lostAfter) : 0,
          idempotencyKey: req.idempotencyKey,
          idempotent: req.idempotent,
          outputLimitBytes: Number(req.outputLimitBytes),
          rate: req.rate && {
            concurrency: req.rate.concurrency,
            concurrencyPercent: req.rate.concurrencyPercent,
            concurrencyPerRegion: req.rate.concurrencyPerRegion,
            maxErrors: req.rate.maxErrors,
            maxErrorsPercent: req.rate.maxErrorsPercent,
            batch: req.rate.batch,
          },
          document: req.document || undefined,
          parameters: req.parameters,
        };
        if (req.dryRun) {
          const plan = await access.dryRun(caller, request);
          return { plan: plan.map(plannedToProto) };
        }
        const job = await access.submit(caller, request);
        return { job: jobToProto(job, jobs.tasksOf(job)) };
      }),
    getJob: (req, ctx) =>
      guard("GetJob", async () => {
        const caller = operator(ctx);
        await access.require(caller, "read", `get job ${req.jobId}`);
        const job = jobs.getJobFor(caller, req.jobId);
        const tasks = jobs.tasksOf(job);
        return { job: jobToProto(job, tasks), tasks: tasks.map((t) => taskToProto(t, job.document ? jobs.shownSteps(t) : undefined)) };
      }),
    exportBundle: (req, ctx) =>
      guard("ExportBundle", async () => {
        const caller = operator(ctx);
        await access.require(caller, "bundle", `export bundle of region ${req.region}`);
        const { bundle, tasks } = await bundles.export(caller, req.region);
        return { bundle, tasks };
      }),
    importBundle: (req, ctx) =>
      guard("ImportBundle", async () => {
        const caller = operator(ctx);
        await access.require(caller, "bundle", "import a results bundle");
        const r = await bundles.import(caller, req.bundle);
        return { statusesApplied: r.statuses, outputChunksApplied: r.chunks, hosts: r.hosts };
      }),
    putDocument: (req, ctx) =>
      guard("PutDocument", async () => ({ document: documentToProto(await access.putDocument(operator(ctx), req.content)) })),
    getDocument: (req, ctx) =>
      guard("GetDocument", async () => ({ document: documentToProto(await access.getDocument(operator(ctx), req.name)) })),
    listDocuments: (_req, ctx) =>
      guard("ListDocuments", async () => ({ documents: (await access.listDocuments(operator(ctx))).map(documentToProto) })),
    listJobs: (req, ctx) =>
      guard("ListJobs", async () => {
        const caller = operator(ctx);
        await access.require(caller, "read", "list jobs");
        const list = jobs.listJobs(caller, req.limit);
        return { jobs: list.map((j) => jobToProto(j, jobs.tasksOf(j))) };
      }),
    cancelJob: (req, ctx) =>
      guard("CancelJob", async () => {
        const job = await access.cancel(operator(ctx), req.jobId);
        return { job: jobToProto(job, jobs.tasksOf(job)) };
      }),
    async *watchJob(req, ctx) {
      let job: JobRecord;
      try {
        const caller = operator(ctx);
        await access.require(caller, "read", `watch job ${req.jobId}`);
        job = jobs.getJobFor(caller, req.jobId);
      } catch (err) {
        throw toConnectError(err);
      }
      for await (const batch of watchJob(jobs, job, { noOutput: req.noOutput, signal: ctx.signal })) {
        yield create(WatchJobResponseSchema, {
          job: batch.job ? jobToProto(batch.job, jobs.tasksOf(batch.job)) : undefined,
          tasks: batch.tasks.map((t) => taskToProto(t)),
          output: batch.output,
        });
      }
    },
  };
}
