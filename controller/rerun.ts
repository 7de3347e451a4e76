import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import type { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { JobRecord, TaskRecord } from "./model.js";
import { SENSITIVE } from "./params.js";
import { INLINE_DOCUMENT, type SubmitRequest } from "./planner.js";

/**
 * RerunJob's request: the hosts chosen among the tasks the caller may read
 * (by state, or named), and the earlier job's request rebuilt from what the
 * controller kept of it. A document run is run again by its exact version
 * with its parameters; a sensitive parameter is kept only redacted, and a
 * document given inline is not kept at all, so those cannot be rerun (the
 * operator submits them again, giving the value).
 */
export function rerunHosts(tasks: readonly TaskRecord[], pick: { states: readonly TaskState[]; hostIds: readonly string[] }): string[] {
  if ((pick.states.length > 0) === (pick.hostIds.length > 0)) throw new InvalidArgumentError("RerunJob takes exactly one of states and host_ids");
  if (pick.hostIds.length > 0) {
    const ofJob = new Set(tasks.map((t) => t.hostId));
    const unknown = pick.hostIds.filter((h) => !ofJob.has(h));
    if (unknown.length > 0) throw new InvalidArgumentError(`not hosts of this job: ${unknown.slice(0, 5).join(", ")}${unknown.length > 5 ? ", …" : ""}`);
    return [...new Set(pick.hostIds)];
  }
  const states = new Set(pick.states);
  const hosts = [...new Set(tasks.filter((t) => states.has(t.state)).map((t) => t.hostId))];
  if (hosts.length === 0) throw new FailedPreconditionError("no host of this job is in the states asked for");
  return hosts;
}

export function rerunRequest(job: JobRecord, hostIds: string[], idempotencyKey: string): SubmitRequest {
  if (job.document?.endsWith(INLINE_DOCUMENT)) throw new FailedPreconditionError(`job ${job.id} ran a document given inline, which the controller does not keep: submit it again`);
  // Kept as the planner resolved them: a string as is, any other type as JSON text, which is how a submit gives them too.
  const parameters = job.parameters ?? {};
  for (const [name, value] of Object.entries(parameters)) {
    if (value === SENSITIVE) throw new FailedPreconditionError(`job ${job.id} has the sensitive parameter ${JSON.stringify(name)}, which is not kept: submit the document again with it`);
  }
  const rate = job.rate;
  return {
    hostIds,
    allHosts: false,
    steps: job.document ? [] : job.steps,
    env: job.env,
    workingDir: job.workingDir,
    stdin: job.stdin,
    timeoutMs: job.timeoutMs,
    deliveryDeadlineMs: Math.max(1, job.deliverBy - job.createdAt),
    lostAfterMs: job.lostAfterMs,
    idempotencyKey,
    idempotent: job.idempotent,
    outputLimitBytes: job.outputLimitBytes,
    rate: rate && {
      concurrency: rate.concurrency || undefined,
      concurrencyPerRegion: rate.perRegion || undefined,
      maxErrors: rate.maxErrors,
      batch: rate.canary.length > 0 && rate.canary.length < hostIds.length ? rate.canary.length : undefined,
    },
    ...(job.document ? { document: job.document, parameters } : {}),
  };
}
