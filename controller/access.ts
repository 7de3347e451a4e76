/**
 * What an operator may do, decided and recorded in one place: each method
 * authorizes (controller/authz.ts) on the resolved hosts, acts, and appends
 * the outcome to the audit log — allowed, denied by policy, or rejected as
 * malformed — before answering. The RPC handlers only translate.
 */
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import { PermissionDeniedError, RexmeshError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import type { AuditDecision, AuditEvent, AuditInput, AuditLog } from "./audit.js";
import type { Action, Authorizer } from "./authz.js";
import type { Inventory } from "./inventory.js";
import { parseTarget, type JobManager, type SubmitRequest } from "./jobs.js";
import type { HostRecord, JobRecord } from "./model.js";
import { selectHosts } from "./query.js";

export class OperatorAccess {
  constructor(private readonly deps: { authz: Authorizer; audit: AuditLog; jobs: JobManager; inventory: Inventory; log: Logger }) {}

  /** Submits a job if the policy allows its steps on every host it resolves to. */
  async submit(caller: PeerIdentity, req: SubmitRequest): Promise<JobRecord> {
    let hosts: readonly HostRecord[] = [];
    let role = "";
    const what = `${describeTarget(req)}: ${describeSteps(req.steps)}`;
    let job: JobRecord;
    try {
      job = await this.deps.jobs.submit(caller, req, (resolved, r) => {
        hosts = resolved;
        role = this.deps.authz.require(caller, { action: "submit", hosts: resolved, steps: r.steps });
      });
    } catch (err) {
      await this.record(caller, "submit", refusal(err), { what, hostIds: hosts.map((h) => h.id) });
      throw err;
    }
    // No role: the idempotency key named a job already submitted (and authorized then).
    const reason = role ? `role ${role}` : `idempotent replay of job ${job.id}`;
    await this.record(caller, "submit", { decision: "allowed", reason }, { what, hostIds: hostsOf(this.deps.jobs, job), jobId: job.id });
    return job;
  }

  async cancel(caller: PeerIdentity, jobId: string): Promise<JobRecord> {
    const what = `cancel job ${jobId}`;
    let job: JobRecord;
    try {
      const role = this.deps.authz.require(caller, { action: "cancel" });
      job = await this.deps.jobs.cancel(caller, jobId);
      await this.record(caller, "cancel", { decision: "allowed", reason: `role ${role}` }, { what, jobId, hostIds: hostsOf(this.deps.jobs, job) });
      return job;
    } catch (err) {
      await this.record(caller, "cancel", refusal(err), { what, jobId });
      throw err;
    }
  }

  /** Changes a host's labels if the host is inside the caller's scope before and after the change. */
  async setLabels(caller: PeerIdentity, hostId: string, set: Record<string, string>, remove: readonly string[]): Promise<HostRecord> {
    const what = describeLabels(set, remove);
    let role = "";
    try {
      const host = await this.deps.inventory.setLabels(caller.scope, hostId, { set, remove }, (before, after) => {
        role = this.deps.authz.require(caller, { action: "label", before, after });
      });
      await this.record(caller, "label", { decision: "allowed", reason: `role ${role}` }, { what, hostIds: [hostId] });
      return host;
    } catch (err) {
      await this.record(caller, "label", refusal(err), { what, hostIds: [hostId] });
      throw err;
    }
  }

  /** Hosts of the caller's tenant, all or those matching a query. */
  async listHosts(caller: PeerIdentity, target: string): Promise<HostRecord[]> {
    await this.require(caller, "read", "list hosts");
    const hosts = this.deps.inventory.list(caller.scope);
    return target === "" ? hosts : selectHosts(parseTarget(target), hosts);
  }

  async listAudit(caller: PeerIdentity, opts: { sinceMs?: number; limit?: number }): Promise<AuditEvent[]> {
    await this.require(caller, "audit", "read the audit log");
    return this.deps.audit.list(caller.scope, opts);
  }

  /** Checks an action that concerns no particular host; a refusal is audited. */
  async require(caller: PeerIdentity, action: Exclude<Action, "submit" | "label">, what: string): Promise<void> {
    const d = this.deps.authz.decide(caller, { action });
    if (d.allowed) return;
    await this.record(caller, action, { decision: "denied", reason: d.reason }, { what });
    throw new PermissionDeniedError(d.reason);
  }

  /** Writes an audit event; a failure to write is logged and, for refusals, never hides the refusal. */
  private async record(caller: PeerIdentity, kind: string, outcome: { decision: AuditDecision; reason: string }, more: Pick<AuditInput, "what" | "hostIds" | "jobId">): Promise<void> {
    const input: AuditInput = { kind, tenant: caller.scope, actor: formatIdentity(caller), ...outcome, ...more };
    try {
      await this.deps.audit.append(input);
    } catch (err) {
      this.deps.log.error("audit event not stored", { kind, actor: input.actor, decision: input.decision, err });
      if (outcome.decision === "allowed") throw err;
    }
    if (outcome.decision !== "allowed") this.deps.log.info("refused", { kind, actor: input.actor, decision: outcome.decision, reason: outcome.reason });
  }
}

function refusal(err: unknown): { decision: AuditDecision; reason: string } {
  if (err instanceof PermissionDeniedError) return { decision: "denied", reason: err.message };
  return { decision: "rejected", reason: err instanceof RexmeshError ? err.message.split("\n")[0]! : "internal error" };
}

function hostsOf(jobs: JobManager, job: JobRecord): string[] {
  return jobs.tasksOf(job).map((t) => t.hostId);
}

function describeTarget(req: SubmitRequest): string {
  if (req.target !== undefined) return `target ${JSON.stringify(req.target)}`;
  if (req.allHosts) return "all hosts";
  return `hosts ${req.hostIds.slice(0, 10).join(",")}${req.hostIds.length > 10 ? ",…" : ""}`;
}

/** Steps as an operator would recognise them: argv for exec, the script for shell. */
export function describeSteps(steps: readonly Step[]): string {
  return steps
    .map((s) => {
      switch (s.tool.case) {
        case "exec":
          return `exec ${s.tool.value.argv.map(quoteArg).join(" ")}`;
        case "shell":
          return `shell ${JSON.stringify(s.tool.value.script)}`;
        default:
          return `tool ${s.tool.case ?? "none"}`;
      }
    })
    .join("; ");
}

function quoteArg(a: string): string {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(a) ? a : JSON.stringify(a);
}

function describeLabels(set: Record<string, string>, remove: readonly string[]): string {
  const parts = [...remove.map((k) => `-${k}`), ...Object.entries(set).map(([k, v]) => `${k}=${quoteArg(v)}`)];
  return `labels ${parts.join(" ")}`;
}
