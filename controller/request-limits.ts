/**
 * Size limits on what operators send to ControllerService, checked where a
 * request enters — before authorization, storage, host resolution or any
 * per-host work — with INVALID_ARGUMENT naming the field and the limit
 * (common/limits.ts, docs/security.md "Input limits"). Also holds the number
 * of WatchJob streams one operator identity may keep open at once
 * (RESOURCE_EXHAUSTED beyond). The service's own handlers keep their checks;
 * these come first so that no handler ever sees a 10 MB host id.
 */
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import { InvalidArgumentError, ResourceExhaustedError } from "../common/errors.js";
import { checkBytes, checkChars, checkCount, ConcurrencyLimit, LIMITS } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { toConnectError } from "../common/rpc-errors.js";
import type {
  CancelJobRequest,
  RerunJobRequest,
  ControllerService,
  ExportBundleRequest,
  GetDocumentRequest,
  GetJobRequest,
  ImportBundleRequest,
  ListHostsRequest,
  ListHostTasksRequest,
  CreateScheduleRequest,
  PutDocumentRequest,
  SetHostLabelsRequest,
  SubmitJobRequest,
  SubmitJobsRequest,
  SubmitAndWatchRequest,
  WatchJobRequest,
} from "../gen/rexmesh/v1/controller_pb.js";

/** Checks one SubmitJob request's sizes (steps are checked again, per tool, by validate.ts). */
export function checkSubmitLimits(req: SubmitJobRequest): void {
  checkCount("host_ids", req.hostIds.length, LIMITS.hostIdsPerJob);
  for (const id of req.hostIds) checkChars("a host id", id, LIMITS.idChars);
  checkCount("steps", req.steps.length, LIMITS.jobSteps);
  checkEnv(req.env);
  checkBytes("working_dir", req.workingDir, LIMITS.workingDirBytes);
  checkBytes("stdin", req.stdin, LIMITS.stdinBytes);
  checkChars("idempotency_key", req.idempotencyKey, LIMITS.idempotencyKeyChars);
  if (req.target !== undefined) checkChars("target", req.target, LIMITS.queryChars);
  checkChars("document", req.document, LIMITS.refChars);
  checkChars("document_content", req.documentContent, LIMITS.documentChars);
  const params = Object.entries(req.parameters);
  checkCount("parameters", params.length, LIMITS.paramsGivenPerJob);
  for (const [name, value] of params) {
    checkChars("a parameter name", name, 64);
    checkBytes(`parameter ${name}`, value, LIMITS.paramGivenBytes);
  }
}

/** Environment variables of a job: how many, and the size of each name, each value and all together. */
export function checkEnv(env: Readonly<Record<string, string>>): void {
  const entries = Object.entries(env);
  checkCount("env", entries.length, LIMITS.envVars);
  let total = 0;
  for (const [name, value] of entries) {
    checkChars("an environment variable name", name, LIMITS.envNameChars);
    checkBytes(`environment variable ${name}`, value, LIMITS.envValueBytes);
    total += name.length + Buffer.byteLength(value);
  }
  if (total > LIMITS.envTotalBytes) throw new InvalidArgumentError(`env (names and values together) is larger than ${LIMITS.envTotalBytes} bytes (${total})`);
}

function checkLabelsLimits(req: SetHostLabelsRequest): void {
  checkChars("host_id", req.hostId, LIMITS.idChars);
  const set = Object.entries(req.set);
  checkCount("label changes", set.length + req.remove.length, LIMITS.labelChangesPerRequest);
  for (const [key, value] of set) {
    checkChars("a label key", key, LIMITS.labelKeyChars);
    checkChars(`label ${key}`, value, LIMITS.labelValueChars);
  }
  for (const key of req.remove) checkChars("a label key", key, LIMITS.labelKeyChars);
}

/** Per method (by local name), the checks of its request. */
const CHECKS: { [K in keyof ServiceImpl<typeof ControllerService>]?: (req: never) => void } = {
  listHosts: (req: ListHostsRequest) => void checkChars("target", req.target, LIMITS.queryChars),
  createSchedule: (req: CreateScheduleRequest) => {
    checkChars("schedule.name", req.schedule?.name ?? "", LIMITS.idChars);
    checkChars("schedule.cron", req.schedule?.cron ?? "", LIMITS.cronChars);
    checkChars("schedule.timezone", req.schedule?.timezone ?? "", LIMITS.idChars);
    if (req.schedule?.job) checkSubmitLimits(req.schedule.job);
  },
  getSchedule: (req: { name: string }) => void checkChars("name", req.name, LIMITS.idChars),
  pauseSchedule: (req: { name: string }) => void checkChars("name", req.name, LIMITS.idChars),
  deleteSchedule: (req: { name: string }) => void checkChars("name", req.name, LIMITS.idChars),
  runSchedule: (req: { name: string }) => void checkChars("name", req.name, LIMITS.idChars),
  listHostTasks: (req: ListHostTasksRequest) => {
    checkChars("host_id", req.hostId, LIMITS.idChars);
    checkChars("page_token", req.pageToken, LIMITS.refChars);
    if (req.pageSize > LIMITS.hostTasksPage) throw new InvalidArgumentError(`page_size ${req.pageSize} is more than ${LIMITS.hostTasksPage}`);
  },
  submitJob: checkSubmitLimits,
  submitJobs: (req: SubmitJobsRequest) => {
    if (req.jobs.length > LIMITS.batchJobs) throw new InvalidArgumentError(`a SubmitJobs call carries at most ${LIMITS.batchJobs} jobs, not ${req.jobs.length}`);
    req.jobs.forEach((job, i) => {
      try {
        checkSubmitLimits(job);
      } catch (err) {
        throw err instanceof InvalidArgumentError ? new InvalidArgumentError(`job ${i + 1}: ${err.message}`) : err;
      }
    });
  },
  submitAndWatch: (req: SubmitAndWatchRequest) => {
    if (req.job) checkSubmitLimits(req.job);
  },
  getJob: (req: GetJobRequest) => void checkChars("job_id", req.jobId, LIMITS.refChars),
  watchJob: (req: WatchJobRequest) => void checkChars("job_id", req.jobId, LIMITS.refChars),
  cancelJob: (req: CancelJobRequest) => {
    checkChars("job_id", req.jobId, LIMITS.refChars);
    checkCount("host_ids", req.hostIds.length, LIMITS.hostIdsPerJob);
    for (const id of req.hostIds) checkChars("a host id", id, LIMITS.idChars);
  },
  rerunJob: (req: RerunJobRequest) => {
    checkChars("job_id", req.jobId, LIMITS.refChars);
    checkCount("host_ids", req.hostIds.length, LIMITS.hostIdsPerJob);
    for (const id of req.hostIds) checkChars("a host id", id, LIMITS.idChars);
    checkCount("states", req.states.length, 32);
    checkChars("idempotency_key", req.idempotencyKey, LIMITS.idempotencyKeyChars);
  },
  exportBundle: (req: ExportBundleRequest) => void checkChars("region", req.region, LIMITS.idChars),
  importBundle: (req: ImportBundleRequest) => checkBytes("bundle", req.bundle, LIMITS.bundleBytes),
  setHostLabels: checkLabelsLimits,
  putDocument: (req: PutDocumentRequest) => void checkChars("content", req.content, LIMITS.documentChars),
  getDocument: (req: GetDocumentRequest) => void checkChars("name", req.name, LIMITS.refChars),
};

/**
 * ControllerService with every request's sizes checked first, and WatchJob
 * streams counted per operator. `callerOf` is the server's (the TLS peer);
 * when it fails, the call goes on to the handler, which refuses it with the
 * right code.
 */
export function withRequestLimits(
  impl: ServiceImpl<typeof ControllerService>,
  deps: { callerOf: (ctx: HandlerContext) => PeerIdentity; log: Logger; watches?: ConcurrencyLimit },
): ServiceImpl<typeof ControllerService> {
  const watches = deps.watches ?? new ConcurrencyLimit(LIMITS.watchesPerOperator, "WatchJob streams for one operator");
  const check = (method: string, req: unknown) => {
    try {
      (CHECKS[method as keyof typeof CHECKS] as ((r: unknown) => void) | undefined)?.(req);
    } catch (err) {
      deps.log.info("request refused at its limits", { method, err });
      throw toConnectError(err);
    }
  };
  const wrapped: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(impl) as [string, (req: unknown, ctx: HandlerContext) => unknown][]) {
    wrapped[name] = (req: unknown, ctx: HandlerContext) => {
      check(name, req);
      return fn.call(impl, req, ctx);
    };
  }
  // A watch, by WatchJob or SubmitAndWatch, holds one of the operator's watch slots while it streams.
  const counted = <Req>(method: "watchJob" | "submitAndWatch", stream: (req: Req, ctx: HandlerContext) => AsyncIterable<unknown>) =>
    async function* (req: Req, ctx: HandlerContext) {
      check(method, req);
    let release = () => {};
    let who: string | undefined;
    try {
      who = formatIdentity(deps.callerOf(ctx));
    } catch {
      who = undefined;
    }
    if (who !== undefined) {
      try {
        release = watches.acquire(who);
      } catch (err) {
        if (err instanceof ResourceExhaustedError) deps.log.info("watch refused", { caller: who, err });
        throw toConnectError(err);
      }
    }
      try {
        yield* stream.call(impl, req, ctx);
      } finally {
        release();
      }
    };
  wrapped.watchJob = counted("watchJob", impl.watchJob);
  wrapped.submitAndWatch = counted("submitAndWatch", impl.submitAndWatch);
  return wrapped as unknown as ServiceImpl<typeof ControllerService>;
}
