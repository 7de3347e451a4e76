/**
 * What an operator may do, decided and recorded in one place: each method
 * authorizes (controller/authz.ts) on the resolved hosts, acts, and appends
 * the outcome to the audit log — allowed, denied by policy, or rejected as
 * malformed — before answering. The RPC handlers only translate.
 */
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import { FailedPreconditionError, PermissionDeniedError, RexmeshError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import type { AuditDecision, AuditEvent, AuditInput, AuditLog } from "./audit.js";
import type { Action, Authorizer } from "./authz.js";
import type { Inventory } from "./inventory.js";
import { parseTarget, type JobManager, type PlannedHost, type SubmitRequest } from "./jobs.js";
import type { DocumentStore, StoredDocument } from "./document-store.js";
import { parseDocumentText } from "./documents.js";
import type { HostRecord, JobRecord } from "./model.js";
import { selectHosts } from "./query.js";

export class OperatorAccess {
  constructor(private readonly deps: { authz: Authorizer; audit: AuditLog; jobs: JobManager; inventory: Inventory; log: Logger; documents?: DocumentStore }) {}

  /**
   * Submits a job if the policy allows its steps on every host it resolves
   * to; a document run is authorized on the steps rendered for its hosts.
   */
  async submit(caller: PeerIdentity, req: SubmitRequest): Promise<JobRecord> {
    let hosts: readonly HostRecord[] = [];
    let role = "";
    const what = `${describeTarget(req)}: ${describeRequest(req)}`;
    let job: JobRecord;
    try {
      job = await this.deps.jobs.submit(caller, req, (resolved, _r, steps) => {
        hosts = resolved;
        role = this.deps.authz.require(caller, { action: "submit", hosts: resolved, steps });
      });
    } catch (err) {
      await this.record(caller, "submit", refusal(err), { what, hostIds: hosts.map((h) => h.id) });
      throw err;
    }
    // No role: the idempotency key named a job already submitted (and authorized then).
    const reason = role ? `role ${role}` : `idempotent replay of job ${job.id}`;
    const done = job.document ? `${describeTarget(req)}: document ${job.document} ${describeParams(job.parameters ?? {})}` : what;
    await this.record(caller, "submit", { decision: "allowed", reason }, { what: done, hostIds: hostsOf(this.deps.jobs, job), jobId: job.id });
    return job;
  }

  /** A dry run: authorized and audited like a submit, but nothing is stored or run. */
  async dryRun(caller: PeerIdentity, req: SubmitRequest): Promise<PlannedHost[]> {
    let hosts: readonly HostRecord[] = [];
    let role = "";
    const what = `dry run, ${describeTarget(req)}: ${describeRequest(req)}`;
    try {
      const plan = this.deps.jobs.dryRun(caller, req, (resolved, _r, steps) => {
        hosts = resolved;
        role = this.deps.authz.require(caller, { action: "submit", hosts: resolved, steps });
      });
      await this.record(caller, "dry-run", { decision: "allowed", reason: `role ${role}` }, { what, hostIds: plan.map((p) => p.host.id) });
      return plan;
    } catch (err) {
      await this.record(caller, "dry-run", refusal(err), { what, hostIds: hosts.map((h) => h.id) });
      throw err;
    }
  }

  /**
   * Stores a document (YAML or JSON text) as its next version. A document
   * runs nothing by itself — every run of it is authorized on the steps it
   * renders — so storing one needs the read action (authz.ts has no
   * host-less check of submit yet).
   */
  async putDocument(caller: PeerIdentity, text: string): Promise<StoredDocument> {
    let what = "put document";
    try {
      const d = this.deps.authz.decide(caller, { action: "read" });
      if (!d.allowed) throw new PermissionDeniedError(d.reason);
      const docs = this.documentStore();
      const doc = parseDocumentText(text);
      what = `put document ${doc.name}`;
      const stored = await docs.put(caller.scope, formatIdentity(caller), doc);
      await this.record(caller, "document", { decision: "allowed", reason: `role ${d.role}` }, { what: `put document ${stored.name}@${stored.version}` });
      return stored;
    } catch (err) {
      await this.record(caller, "document", refusal(err), { what });
      throw err;
    }
  }

  async getDocument(caller: PeerIdentity, ref: string): Promise<StoredDocument> {
    await this.require(caller, "read", `get document ${ref}`);
    return this.documentStore().get(caller.scope, ref);
  }

  async listDocuments(caller: PeerIdentity): Promise<StoredDocument[]> {
    await this.require(caller, "read", "list documents");
    return this.documentStore().list(caller.scope);
  }

  private documentStore(): DocumentStore {
    if (!this.deps.documents) throw new FailedPreconditionError("this controller does not keep documents");
    return this.deps.documents;
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

/** What a request runs, for the audit log: steps, or a document and the NAMES of its parameters (values may be sensitive). */
function describeRequest(req: SubmitRequest): string {
  if (!req.document) return describeSteps(req.steps);
  const names = Object.keys(req.parameters ?? {});
  return `document ${req.document}${names.length ? ` (parameters given: ${names.join(", ")})` : ""}`;
}

/** Redacted parameters as `k=v` words. */
function describeParams(params: Record<string, string>): string {
  return Object.entries(params).map(([k, v]) => `${k}=${quoteArg(v)}`).join(" ");
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
