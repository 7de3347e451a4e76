/**
 * What an operator may do, decided and recorded in one place.
 *
 * {@link OperatorAccess.decideCall} is the controller's boundary decider
 * (common/connect-server.ts calls it for every call that is not open): it
 * admits the caller by certificate, checks that a role grants the declared
 * action, decides scopes the request itself shows (the tenant, named
 * hosts), and audits. Calls whose scope is the hosts a request resolves to
 * (a target, a job's tasks, a region) are then decided here, by the method
 * the handler calls, on the resolved hosts — allowed, denied by policy, or
 * rejected as malformed — and audited before the caller gets its answer.
 * The RPC handlers only translate.
 */
import { formatIdentity, sameIdentity, type PeerIdentity } from "../certs/identity.js";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError, RexmeshError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { admit, operatorAction, pathOf, type Call, type Grant } from "../common/rpc-access.js";
import type { Step, TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { rerunHosts, rerunRequest } from "./rerun.js";
import type { SignedRelease } from "../gen/rexmesh/v1/release_pb.js";
import { manifestOf } from "./releases.js";
import { stepArtifacts } from "../common/step-tool.js";
import { fromBinary } from "@bufbuild/protobuf";
import { SubmitJobRequestSchema, type ScheduleSpec } from "../gen/rexmesh/v1/controller_pb.js";
import type { Clock } from "../common/clock.js";
import { newSchedule, SCHEDULE_KEY_PREFIX, type Scheduler, type ScheduleRecord, type ScheduleStore } from "./schedules.js";
import { submitRequestOf } from "./planner.js";
import { TRIGGER_KEY_PREFIX } from "./triggers.js";
import type { SessionSpec } from "../gen/rexmesh/v1/session_pb.js";
import { checkChars, LIMITS } from "../common/limits.js";
import { checkSessionSpec } from "../common/session-frames.js";
import type { DenyList, RevokedIdentity } from "../gen/rexmesh/v1/revocation_pb.js";
import type { AuditDecision, AuditEvent, AuditInput, AuditLog } from "./audit.js";
import { isAction, revokeAction, type AccessRequest, type Action, type Authorizer } from "./authz.js";
import type { BundleService } from "./bundles.js";
import type { Inventory } from "./inventory.js";
import { parseTarget, type JobManager, type PlannedHost, type SubmitRequest } from "./jobs.js";
import type { DocumentStore, StoredDocument } from "./document-store.js";
import { documentWarnings, parseDocumentText } from "./documents.js";
import type { HostRecord, JobRecord, TaskRecord } from "./model.js";
import { selectHosts } from "./query.js";
import type { Revocations } from "./revocation.js";
import { listSessions, sessionOf, type RecordedEvent, type RecordingStore, type SessionSummary } from "./recordings.js";

/** Which artifacts a tenant holds (controller/artifacts.ts). */
export interface ArtifactIndex {
  has(tenant: string, digest: string): boolean;
}

export interface OperatorAccessDeps {
  authz: Authorizer;
  audit: AuditLog;
  jobs: JobManager;
  inventory: Inventory;
  log: Logger;
  documents?: DocumentStore;
  /** Without it, a step that uses an artifact is refused. */
  artifacts?: ArtifactIndex;
  revocations?: Revocations;
  bundles?: BundleService;
  /** Session recordings (controller/recordings.ts); without it, none are listed. */
  recordings?: RecordingStore;
  /** Schedules (controller/schedules.ts); without them, the schedule calls are FAILED_PRECONDITION. */
  schedules?: { store: ScheduleStore; scheduler: Scheduler; clock: Clock };
}

/** A job as the caller may see it: the tasks on hosts its read roles cover. */
export interface VisibleJob {
  job: JobRecord;
  tasks: TaskRecord[];
}

export class OperatorAccess {
  constructor(private readonly deps: OperatorAccessDeps) {}

  // ---- the boundary ---------------------------------------------------------

  /**
   * Decides a call at the boundary: the caller's certificate and the
   * method's declaration, the policy action, and the scope when the
   * request names it. Every refusal is audited here; an allowed call too,
   * unless its scope is decided (and audited) by the method it reaches.
   */
  async decideCall(call: Call): Promise<Grant> {
    const d = call.declared.declaration;
    const method = pathOf(call.declared.method);
    const summary = "open" in d || !d.summary || call.request === undefined ? undefined : d.summary(call.request);
    const what = summary?.what ?? method.slice(method.lastIndexOf(".") + 1);
    let kind = "open" in d ? "open" : d.operator ? (typeof d.operator.action === "string" ? d.operator.action : "call") : (d.peer?.action ?? "call");
    let hostIds: string[] = summary?.hostIds ?? [];
    try {
      if ("open" in d) return { peer: call.peer, action: "open", by: "open" };
      const { peer, operator, peerRule } = admit(call);
      if (peerRule) {
        const grant = { peer, action: peerRule.action, by: peerRule.scope };
        if (d.auditedBy !== "service") await this.record(peer, peerRule.action, { decision: "allowed", reason: `${peer.role} certificate` }, { what });
        return grant;
      }
      const action = operatorAction(operator!, call.request);
      kind = action;
      if (!isAction(action)) throw new PermissionDeniedError(`unknown action ${JSON.stringify(action)}`);
      const asked = operator!.scope === "hosts" && operator!.hostsOf ? operator!.hostsOf(call.request) : [];
      const named = asked === "all" ? [] : asked.filter((id) => id !== "");
      if (named.length > 0) hostIds = named;
      const decision =
        asked === "all"
          ? this.deps.authz.decide(peer, { action, allHosts: true } as AccessRequest)
          : named.length > 0
            ? this.deps.authz.decide(peer, { action, hosts: named.map((id) => this.hostFor(peer.scope, id)) } as AccessRequest)
            : this.deps.authz.holds(peer, action);
      if (!decision.allowed) throw new PermissionDeniedError(decision.reason);
      const decidedLater = operator!.scope === "hosts" && !operator!.hostsOf;
      if (!decidedLater && d.auditedBy !== "service") await this.record(peer, action, { decision: "allowed", reason: `role ${decision.role}` }, { what, hostIds });
      return { peer, action, by: decision.role };
    } catch (err) {
      await this.record(call.peer, kind, refusal(err), { what, hostIds });
      throw err;
    }
  }

  // ---- schedules (docs/schedules.md) -------------------------------------------

  private scheduling(): NonNullable<OperatorAccessDeps["schedules"]> {
    if (!this.deps.schedules) throw new FailedPreconditionError("this controller runs no schedules");
    return this.deps.schedules;
  }

  /**
   * A new schedule of the caller's tenant. Its job must be one the caller
   * may submit now (a dry run, audited as one); each firing is authorized
   * again, as the caller's submit, when it fires.
   */
  async createSchedule(caller: PeerIdentity, spec: ScheduleSpec): Promise<ScheduleRecord> {
    const s = this.scheduling();
    // A document by name is pinned to its newest version now: who may change the document must not change what the schedule runs.
    if (spec.job?.document && !spec.job.document.includes("@") && this.deps.documents) {
      const doc = this.deps.documents.get(caller.scope, spec.job.document);
      spec.job.document = `${doc.name}@${doc.version}`;
    }
    const rec = newSchedule(caller, spec, s.clock.now());
    await this.dryRun(caller, submitRequestOf(spec.job!));
    await s.scheduler.exclusive(async () => {
      if (s.store.get(caller.scope, rec.name)) throw new AlreadyExistsError(`schedule ${JSON.stringify(rec.name)} exists already`);
      if (s.store.all().filter((r) => r.tenant === caller.scope).length >= LIMITS.schedulesPerTenant) throw new ResourceExhaustedError(`the tenant has ${LIMITS.schedulesPerTenant} schedules already`);
      await s.store.put(rec);
    });
    await s.scheduler.wake();
    return rec;
  }

  /** The schedules of the caller's tenant it may see: its own, and those whose job's hosts its read roles all cover now. */
  listSchedules(caller: PeerIdentity): ScheduleRecord[] {
    return this.scheduling()
      .store.all()
      .filter((r) => r.tenant === caller.scope && this.maySeeSchedule(caller, r));
  }

  /** A schedule of the caller's tenant it may see; NOT_FOUND otherwise (another's schedule on hosts it does not read looks missing). */
  getSchedule(caller: PeerIdentity, name: string): ScheduleRecord {
    const rec = this.scheduling().store.get(caller.scope, name);
    if (!rec || !this.maySeeSchedule(caller, rec)) throw new NotFoundError(`no schedule ${JSON.stringify(name)}`);
    return rec;
  }

  private maySeeSchedule(caller: PeerIdentity, rec: ScheduleRecord): boolean {
    return this.maySeeStandingJob(caller, rec.creator, submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request)));
  }

  /**
   * Whether the caller may see a standing job of another operator (a
   * schedule's, a trigger's): its creator may; anyone else when its read
   * roles cover every host the job names now, resolved as a submit
   * resolves them (none — a target that matches nothing — shows nothing).
   */
  maySeeStandingJob(caller: PeerIdentity, creator: PeerIdentity, req: SubmitRequest): boolean {
    if (sameIdentity(caller, creator)) return true;
    let hosts: HostRecord[];
    try {
      hosts = this.deps.jobs.resolveHosts(caller.scope, req);
    } catch {
      return false;
    }
    return this.readable(caller, hosts).length === hosts.length;
  }

  /**
   * Someone other than a schedule's creator changes or runs it only if it
   * may submit the schedule's job itself now (a dry run as the caller,
   * audited as one): `schedule` alone does not lend the creator's rights.
   */
  private async mayChangeSchedule(caller: PeerIdentity, rec: ScheduleRecord): Promise<void> {
    await this.mayChangeStandingJob(caller, rec.creator, submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request)));
  }

  /** Someone other than the creator of a standing job changes it only if it may submit that job itself now (see mayChangeSchedule). */
  async mayChangeStandingJob(caller: PeerIdentity, creator: PeerIdentity, req: SubmitRequest): Promise<void> {
    if (sameIdentity(caller, creator)) return;
    await this.dryRun(caller, req);
  }

  /** Pauses or resumes: a resumed schedule goes on from now (what would have fired while paused never does). */
  async pauseSchedule(caller: PeerIdentity, name: string, paused: boolean): Promise<ScheduleRecord> {
    const s = this.scheduling();
    await this.mayChangeSchedule(caller, this.getSchedule(caller, name));
    const rec = await s.scheduler.setPaused(caller.scope, name, paused);
    await s.scheduler.wake();
    return rec;
  }

  async deleteSchedule(caller: PeerIdentity, name: string): Promise<void> {
    const s = this.scheduling();
    await this.mayChangeSchedule(caller, this.getSchedule(caller, name));
    await s.scheduler.exclusive(async () => {
      this.getSchedule(caller, name);
      await s.store.remove(caller.scope, name);
    });
  }

  async runSchedule(caller: PeerIdentity, name: string): Promise<string> {
    const rec = this.getSchedule(caller, name);
    // Run by another operator, the firing is that operator's submit, authorized and audited as theirs.
    return this.scheduling().scheduler.runNow(caller.scope, name, sameIdentity(caller, rec.creator) ? undefined : caller);
  }

  /**
   * One firing of a schedule: its creator's submit, authorized and audited
   * as one now, with the firing's idempotency key. A creator whose
   * certificate was revoked since is refused.
   */
  async fireSchedule(rec: ScheduleRecord, key: string, by: PeerIdentity = rec.creator): Promise<string> {
    return this.fireAs(by, { ...submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request)), idempotencyKey: key, schedule: rec.name });
  }

  /**
   * A standing job's firing (a schedule's, a trigger's): the submit of the
   * operator `by`, authorized and audited as one now, under the firing's
   * own idempotency key; resolves with the job id. An operator whose
   * certificate was revoked since is refused.
   */
  async fireAs(by: PeerIdentity, req: SubmitRequest): Promise<string> {
    if (this.deps.revocations?.isRevoked(by)) throw new PermissionDeniedError(`the certificate of ${formatIdentity(by)}, whose submit the firing is, was revoked`);
    const job = await this.submit(by, req);
    return job.id;
  }

  // ---- hosts ------------------------------------------------------------------

  /** The hosts of the caller's tenant its read roles cover: all, or those matching a query. */
  async listHosts(caller: PeerIdentity, target: string): Promise<HostRecord[]> {
    return this.decided(caller, "read", target === "" ? "list hosts" : `list hosts ${JSON.stringify(target)}`, async () => {
      const hosts = this.readable(caller, this.deps.inventory.list(caller.scope));
      const shown = target === "" ? hosts : selectHosts(parseTarget(target), hosts);
      return { value: shown, hostIds: shown.map((h) => h.id) };
    });
  }

  /**
   * Changes a host's labels. Allowed when a role granting `label` covers
   * the host before and after the change, and the change gives the caller
   * no power on the host it did not hold before (controller/authz.ts).
   */
  async setLabels(caller: PeerIdentity, hostId: string, set: Record<string, string>, remove: readonly string[]): Promise<HostRecord> {
    const what = describeLabels(set, remove);
    let role = "";
    try {
      this.holds(caller, "label");
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

  // ---- sessions ---------------------------------------------------------------

  /**
   * Decides a session (docs/sessions.md): a role names `session`, covers
   * the host and allows what the session runs (controller/authz.ts). A host
   * the tenant does not have is judged by its id alone, then reported not
   * found. Audited either way; returns the host.
   */
  async openSession(caller: PeerIdentity, sessionId: string, hostId: string, spec: SessionSpec): Promise<{ host: HostRecord; limits: { idleMs?: number; maxMs?: number; strictRecording?: boolean } }> {
    const what = `session ${sessionId}: ${describeSession(spec)}`;
    // A port forward is a session too, under an action of its own: the RPC it came by was declared with it.
    const action = spec.forward ? "forward" : "session";
    try {
      this.holds(caller, action);
      checkChars("host_id", hostId, LIMITS.idChars);
      checkSessionSpec(spec);
      const host = this.hostFor(caller.scope, hostId);
      const role = this.deps.authz.require(caller, spec.forward ? { action: "forward", host, to: spec.forward } : { action: "session", host, argv: spec.argv });
      if (!this.knowsHost(caller, hostId)) throw new NotFoundError(`host ${JSON.stringify(hostId)} not found`);
      await this.record(caller, action, { decision: "allowed", reason: `role ${role}` }, { what, hostIds: [hostId] });
      return { host, limits: this.deps.authz.sessionLimits(role) };
    } catch (err) {
      await this.record(caller, action, refusal(err), { what, hostIds: [hostId] });
      throw err;
    }
  }

  /** The end of a session that was allowed: how it ended, in the audit log. */
  async sessionEnded(caller: PeerIdentity, sessionId: string, hostId: string, outcome: string): Promise<void> {
    await this.record(caller, "session.end", { decision: "allowed", reason: outcome }, { what: `session ${sessionId}`, hostIds: [hostId] });
  }

  // ---- jobs -------------------------------------------------------------------

  /**
   * Submits a job if one role allows its steps, its environment and every
   * host it resolves to; a document run is authorized on the steps
   * rendered for its hosts. An idempotency key that names a job already
   * submitted is authorized exactly like a new submit, and returns that
   * job only when it is the job this request describes.
   */
  async submit(caller: PeerIdentity, req: SubmitRequest): Promise<JobRecord> {
    let hosts: readonly HostRecord[] = [];
    let role = "";
    const what = `${req.schedule ? `schedule ${req.schedule}, ` : ""}${req.trigger ? `trigger ${req.trigger}, ` : ""}${describeTarget(req)}: ${describeRequest(req)}`;
    // Schedules' and triggers' firings have keys of their own: an operator cannot take one first and so block the firing.
    if (!req.schedule && req.idempotencyKey.startsWith(SCHEDULE_KEY_PREFIX)) throw new InvalidArgumentError(`idempotency keys starting ${JSON.stringify(SCHEDULE_KEY_PREFIX)} are the schedules' own`);
    if (!req.trigger && req.idempotencyKey.startsWith(TRIGGER_KEY_PREFIX)) throw new InvalidArgumentError(`idempotency keys starting ${JSON.stringify(TRIGGER_KEY_PREFIX)} are the triggers' own`);
    const authorize = (resolved: readonly HostRecord[], _r: SubmitRequest, steps: readonly Step[]) => {
      hosts = resolved;
      role = this.authorizeRun(caller, resolved, steps, req.env);
    };
    let job: JobRecord;
    try {
      this.holds(caller, "submit");
      // A replay passes what a new submit passes (the job manager resolves and authorizes it first) and
      // returns the job only for the same request; another request under the key is ALREADY_EXISTS.
      job = await this.deps.jobs.submit(caller, req, authorize);
    } catch (err) {
      const shown = this.hideUnreadableJob(caller, err);
      await this.record(caller, "submit", refusal(shown), { what, hostIds: hosts.map((h) => h.id) });
      throw shown;
    }
    const done = job.document ? `${describeTarget(req)}: document ${job.document} ${describeParams(job.parameters ?? {})}` : what;
    await this.record(caller, "submit", { decision: "allowed", reason: `role ${role}` }, { what: done, hostIds: hostsOf(this.deps.jobs, job), jobId: job.id });
    return job;
  }

  /** A dry run: authorized and audited like a submit, but nothing is stored or run. */
  async dryRun(caller: PeerIdentity, req: SubmitRequest): Promise<PlannedHost[]> {
    let hosts: readonly HostRecord[] = [];
    let role = "";
    const what = `dry run, ${describeTarget(req)}: ${describeRequest(req)}`;
    try {
      this.holds(caller, "submit");
      const plan = this.deps.jobs.dryRun(caller, req, (resolved, _r, steps) => {
        hosts = resolved;
        role = this.authorizeRun(caller, resolved, steps, req.env);
      });
      await this.record(caller, "dry-run", { decision: "allowed", reason: `role ${role}` }, { what, hostIds: plan.map((p) => p.host.id) });
      return plan;
    } catch (err) {
      await this.record(caller, "dry-run", refusal(err), { what, hostIds: hosts.map((h) => h.id) });
      throw err;
    }
  }

  /**
   * RerunJob: the earlier job as the caller may read it (audited as a read),
   * then a submit of its request on the hosts picked among those tasks —
   * authorized and audited exactly as that submit.
   */
  async rerun(caller: PeerIdentity, jobId: string, pick: { states: readonly TaskState[]; hostIds: readonly string[] }, idempotencyKey: string): Promise<JobRecord> {
    const { job, tasks } = await this.getJob(caller, jobId, `rerun job ${jobId}`);
    let req: SubmitRequest;
    try {
      req = rerunRequest(job, rerunHosts(tasks, pick), idempotencyKey);
    } catch (err) {
      await this.record(caller, "submit", refusal(err), { what: `rerun job ${jobId}`, jobId });
      throw err;
    }
    return this.submit(caller, req);
  }

  /** The policy decision for running steps on hosts, then the artifacts they use: the caller's tenant must hold them. */
  private authorizeRun(caller: PeerIdentity, hosts: readonly HostRecord[], steps: readonly Step[], env: Readonly<Record<string, string>>): string {
    const role = this.deps.authz.require(caller, { action: "submit", hosts, steps, env });
    for (const step of steps) {
      for (const digest of stepArtifacts(step)) if (!this.deps.artifacts?.has(caller.scope, digest)) throw new NotFoundError(`no artifact ${digest}`);
    }
    return role;
  }

  /** A reused idempotency key names its job only to a caller who may read that job. */
  private hideUnreadableJob(caller: PeerIdentity, err: unknown): unknown {
    if (!(err instanceof AlreadyExistsError) || err.jobId === undefined) return err;
    const job = this.deps.jobs.getJobRecord(err.jobId);
    if (job && this.visible(caller, job)) return err;
    return new AlreadyExistsError("this idempotency key was already used, with a different request", { cause: err });
  }

  /**
   * Cancels a job — or, with `only`, its tasks on those hosts — if one role
   * granting `cancel` covers the hosts of all the tasks cancelled.
   */
  async cancel(caller: PeerIdentity, jobId: string, only: readonly string[] = []): Promise<JobRecord> {
    const what = only.length ? `cancel job ${jobId} on ${only.length} host${only.length > 1 ? "s" : ""}` : `cancel job ${jobId}`;
    let hostIds: string[] = [];
    try {
      this.holds(caller, "cancel");
      const job = this.deps.jobs.getJobFor(caller, jobId);
      const chosen = new Set(only);
      const tasks = this.deps.jobs.tasksOf(job).filter((t) => chosen.size === 0 || chosen.has(t.hostId));
      if (chosen.size > 0 && tasks.length < chosen.size) {
        const known = new Set(tasks.map((t) => t.hostId));
        throw new InvalidArgumentError(`job ${jobId} has no task on ${[...chosen].filter((h) => !known.has(h)).slice(0, 5).join(", ")}`);
      }
      const hosts = this.hostsOfTasks(caller, tasks);
      hostIds = hosts.map((h) => h.id);
      const role = this.deps.authz.require(caller, { action: "cancel", hosts });
      const cancelled = chosen.size > 0 ? await this.deps.jobs.cancelTasks(caller, jobId, chosen) : await this.deps.jobs.cancel(caller, jobId);
      await this.record(caller, "cancel", { decision: "allowed", reason: `role ${role}` }, { what, jobId, hostIds });
      return cancelled;
    } catch (err) {
      await this.record(caller, "cancel", refusal(err), { what, jobId, hostIds });
      throw err;
    }
  }

  /**
   * A job the caller may read: one with a task on a host its read roles
   * cover, with only those tasks. Any other job is NOT_FOUND, exactly like
   * one that does not exist.
   */
  async getJob(caller: PeerIdentity, jobId: string, what = `get job ${jobId}`): Promise<VisibleJob> {
    return this.decided(caller, "read", what, async () => {
      const visible = this.visible(caller, this.deps.jobs.getJobFor(caller, jobId));
      if (!visible) throw new NotFoundError(`job ${JSON.stringify(jobId)} not found`);
      return { value: visible, hostIds: visible.tasks.map((t) => t.hostId), jobId };
    });
  }

  /**
   * One host's queue: its tasks of every job, newest first, paged. The host
   * must be the caller's tenant's and covered by a role granting `read`
   * (NOT_FOUND otherwise: another tenant's host looks like a missing one).
   */
  async listHostTasks(caller: PeerIdentity, hostId: string, pageSize: number, pageToken: string, unfinished: boolean): Promise<ReturnType<JobManager["hostTasks"]>> {
    return this.decided(caller, "read", `host queue ${hostId}`, async () => {
      const host = this.knowsHost(caller, hostId) ? this.hostFor(caller.scope, hostId) : undefined;
      if (!host || this.readable(caller, [host]).length === 0) throw new NotFoundError(`host ${JSON.stringify(hostId)} not found`);
      return { value: this.deps.jobs.hostTasks(caller, hostId, pageSize, pageToken, unfinished), hostIds: [hostId] };
    });
  }

  /** The newest jobs of the tenant the caller may read, each with the tasks it may read. */
  async listJobs(caller: PeerIdentity, limit: number): Promise<VisibleJob[]> {
    return this.decided(caller, "read", "list jobs", async () => {
      const list = this.deps.jobs.listJobs(caller, limit).map((j) => this.visible(caller, j)).filter((v): v is VisibleJob => v !== undefined);
      return { value: list };
    });
  }

  private visible(caller: PeerIdentity, job: JobRecord): VisibleJob | undefined {
    const tasks = this.deps.jobs.tasksOf(job);
    const readable = new Set(this.readable(caller, this.hostsOfTasks(caller, tasks)).map((h) => h.id));
    const shown = tasks.filter((t) => readable.has(t.hostId));
    return shown.length > 0 ? { job, tasks: shown } : undefined;
  }

  // ---- documents, audit -------------------------------------------------------

  /**
   * Stores a document (YAML or JSON text) as its next version. A document
   * runs nothing by itself — every run of it is authorized on the steps it
   * renders — but a new version changes what a run by name does, so
   * storing one is its own action (`document`), checked at the boundary.
   */
  async putDocument(caller: PeerIdentity, text: string): Promise<{ stored: StoredDocument; warnings: string[] }> {
    const doc = parseDocumentText(text);
    const stored = await this.documentStore().put(caller.scope, formatIdentity(caller), doc);
    const warnings = documentWarnings(doc);
    this.deps.log.info("document stored", { document: `${stored.name}@${stored.version}`, by: formatIdentity(caller), warnings: warnings.length });
    return { stored, warnings };
  }

  async getDocument(caller: PeerIdentity, ref: string): Promise<StoredDocument> {
    return this.documentStore().get(caller.scope, ref);
  }

  async listDocuments(caller: PeerIdentity): Promise<StoredDocument[]> {
    return this.documentStore().list(caller.scope);
  }

  private documentStore(): DocumentStore {
    if (!this.deps.documents) throw new FailedPreconditionError("this controller does not keep documents");
    return this.deps.documents;
  }

  async listAudit(caller: PeerIdentity, opts: { sinceMs?: number; limit?: number }): Promise<AuditEvent[]> {
    return this.deps.audit.list(caller.scope, opts);
  }

  // ---- session recordings ---------------------------------------------------------

  /** Watching a session that runs (what `watch` opens), audited like a replay: allowed or refused. */
  async joinSession<T>(caller: PeerIdentity, id: string, watch: () => T & { info: { hostId: string } }): Promise<T> {
    const what = `watch session ${id.slice(0, LIMITS.idChars)}`;
    try {
      const w = watch();
      await this.record(caller, "session.join", { decision: "allowed", reason: "" }, { what, hostIds: [w.info.hostId] });
      return w;
    } catch (err) {
      await this.record(caller, "session.join", refusal(err), { what });
      throw err;
    }
  }

  listSessions(caller: PeerIdentity, limit: number): SessionSummary[] {
    return this.deps.recordings ? listSessions(this.deps.recordings, caller.scope, limit) : [];
  }

  /**
   * A session's summary and its recording, in chunks. Replaying holds what
   * was typed (a password too): each replay is in the audit log, a refused
   * one as well.
   */
  async playSession(caller: PeerIdentity, id: string): Promise<{ summary: SessionSummary; chunks: Iterable<RecordedEvent[]> }> {
    const what = `replay session ${id.slice(0, LIMITS.idChars)}`;
    try {
      if (!this.deps.recordings) throw new NotFoundError(`session ${JSON.stringify(id.slice(0, LIMITS.idChars))} not found: this controller keeps no recordings`);
      const summary = sessionOf(this.deps.recordings, caller.scope, id);
      await this.record(caller, "session.play", { decision: "allowed", reason: "" }, { what, hostIds: [summary.hostId] });
      return { summary, chunks: this.deps.recordings.events(id) };
    } catch (err) {
      await this.record(caller, "session.play", refusal(err), { what });
      throw err;
    }
  }

  // ---- bundles ------------------------------------------------------------------

  /** A region's tasks bundle, if one role granting `bundle` covers every host of the caller's tenant in that region. */
  async exportBundle(caller: PeerIdentity, region: string): Promise<{ bundle: Uint8Array; tasks: number }> {
    const what = `export bundle of region ${region}`;
    let hostIds: string[] = [];
    try {
      const all = this.deps.inventory.list(caller.scope);
      const hosts = all.filter((h) => h.region === region);
      hostIds = hosts.map((h) => h.id);
      const role = this.deps.authz.require(caller, hosts.length > 0 ? { action: "bundle", hosts } : { action: "bundle" });
      if (hosts.length === 0) {
        // Nothing can be queued for a region with no known host (a site's hosts become known with its first results bundle).
        const known = [...new Set(all.map((h) => h.region))].sort();
        throw new NotFoundError(`no host of tenant ${caller.scope} is known in region ${region}${known.length > 0 ? ` (regions with hosts: ${known.join(", ")})` : ""}; a site's hosts become known when its first results bundle is imported`);
      }
      const out = await this.bundleService().export(caller, region);
      await this.record(caller, "bundle", { decision: "allowed", reason: `role ${role}` }, { what: `${what}: ${out.tasks} tasks`, hostIds });
      return out;
    } catch (err) {
      await this.record(caller, "bundle", refusal(err), { what, hostIds });
      throw err;
    }
  }

  /**
   * Imports a results bundle: the caller's tenant's part of it, if one role
   * granting `bundle` covers every host it reports on. (The bundle itself is
   * checked by BundleService: signer, revocation, region of every task.)
   */
  async importBundle(caller: PeerIdentity, bytes: Uint8Array): Promise<{ statuses: number; chunks: number; hosts: number }> {
    let hostIds: string[] = [];
    let role = "";
    try {
      this.holds(caller, "bundle");
      const r = await this.bundleService().import(caller, bytes, (ids) => {
        hostIds = [...ids];
        const hosts = ids.map((id) => this.hostFor(caller.scope, id));
        role = this.deps.authz.require(caller, hosts.length > 0 ? { action: "bundle", hosts } : { action: "bundle" });
      });
      await this.record(caller, "bundle", { decision: "allowed", reason: `role ${role}` }, { what: `import results bundle: ${r.statuses} statuses, ${r.chunks} output chunks`, hostIds });
      return r;
    } catch (err) {
      await this.record(caller, "bundle", refusal(err), { what: "import results bundle", hostIds });
      throw err;
    }
  }

  private bundleService(): BundleService {
    if (!this.deps.bundles) throw new FailedPreconditionError("this controller does not make bundles");
    return this.deps.bundles;
  }

  // ---- revocation -------------------------------------------------------------

  /**
   * Revokes an identity. A host of the caller's tenant needs a role
   * granting `revoke` whose selector covers it (an id the controller does
   * not know is judged by its id alone); an operator of the caller's tenant
   * needs `revoke.operator`; a proxy, shared by every tenant, needs
   * `revoke.proxy`, which a role must name.
   */
  async revoke(caller: PeerIdentity, req: { role: string; scope: string; id: string; reason: string }): Promise<RevokedIdentity> {
    const action = revokeAction(req.role);
    const scope = req.scope || (req.role === "proxy" ? "" : caller.scope);
    const what = `revoke ${req.role} ${scope ? `${scope}/` : ""}${req.id}${req.reason ? ` (${req.reason})` : ""}`;
    const hostIds = req.role === "host" ? [req.id] : [];
    try {
      // Zero certificates (role enroll) are a tenant's own credentials, revoked like its hosts.
      if (!["host", "operator", "proxy", "enroll"].includes(req.role)) throw new InvalidArgumentError("role must be host, proxy, operator or enroll");
      if (req.role !== "proxy" && scope !== caller.scope) throw new PermissionDeniedError(`an operator of tenant ${caller.scope} cannot revoke identities of tenant ${scope}`);
      // A zero certificate enrolls any host id: revoking it stops every enrollment with it, so it needs
      // token on all hosts, like an unbound join token.
      const asked: AccessRequest = req.role === "host" ? { action: "revoke", hosts: [this.hostFor(caller.scope, req.id)] } : req.role === "enroll" ? { action: "token", allHosts: true, what: "revoke a zero certificate (it enrolls any host id)" } : ({ action } as AccessRequest);
      const role = this.deps.authz.require(caller, asked);
      const entry = await this.revocations().revoke(caller, req);
      await this.record(caller, action, { decision: "allowed", reason: `role ${role}${req.reason ? `; reason given: ${req.reason}` : ""}` }, { what: entry.uri, hostIds });
      return entry;
    } catch (err) {
      await this.record(caller, action, refusal(err), { what, hostIds });
      throw err;
    }
  }

  /** The deny-list as the caller may see it: its own tenant's identities, and the proxies every tenant shares. */
  listRevoked(caller: PeerIdentity): DenyList {
    const list = this.revocations().denyList;
    const own = [`rexmesh://host/${caller.scope}/`, `rexmesh://operator/${caller.scope}/`, `rexmesh://enroll/${caller.scope}/`, "rexmesh://proxy/"];
    return { ...list, entries: list.entries.filter((e) => own.some((p) => e.uri.startsWith(p))) };
  }

  private revocations(): Revocations {
    if (!this.deps.revocations) throw new FailedPreconditionError("this controller keeps no deny-list");
    return this.deps.revocations;
  }

  // ---- helpers ------------------------------------------------------------------

  /** Refuses unless some role grants the action at all (what the boundary checked; scoped methods ask it first too). */
  private holds(caller: PeerIdentity, action: Action): void {
    const d = this.deps.authz.holds(caller, action);
    if (!d.allowed) throw new PermissionDeniedError(d.reason);
  }

  /** A read decided on what it returns: audited as allowed with the hosts shown, or as refused. */
  private async decided<T>(caller: PeerIdentity, action: Action, what: string, fn: () => Promise<{ value: T; hostIds?: string[]; jobId?: string }>): Promise<T> {
    try {
      this.holds(caller, action);
      const { value, hostIds, jobId } = await fn();
      await this.record(caller, action, { decision: "allowed", reason: "hosts covered by the caller's read roles" }, { what, hostIds, jobId });
      return value;
    } catch (err) {
      await this.record(caller, action, refusal(err), { what });
      throw err;
    }
  }

  /** Whether some role of the caller grants `action` at all; PERMISSION_DENIED otherwise. */
  requireAction(caller: PeerIdentity, action: Action): void {
    this.holds(caller, action);
  }

  /** The ids of the hosts of the caller's tenant, among `ids`, that its read roles cover. */
  readableIds(caller: PeerIdentity, ids: Iterable<string>): Set<string> {
    const hosts = [...new Set(ids)].map((id) => this.hostFor(caller.scope, id));
    return new Set(this.readable(caller, hosts).map((h) => h.id));
  }

  private readable(caller: PeerIdentity, hosts: readonly HostRecord[]): HostRecord[] {
    return this.deps.authz.covered(caller, "read", hosts);
  }

  /** The hosts of tasks, as records of the caller's tenant. */
  private hostsOfTasks(caller: PeerIdentity, tasks: readonly TaskRecord[]): HostRecord[] {
    const ids = [...new Set(tasks.map((t) => t.hostId))];
    return ids.map((id) => this.hostFor(caller.scope, id));
  }

  /** Whether the caller's tenant has a host of this id in the inventory (it connected at least once). */
  knowsHost(caller: PeerIdentity, id: string): boolean {
    return this.deps.inventory.get(id)?.tenant === caller.scope;
  }

  /**
   * A host of the tenant as the policy judges it. An id the controller does
   * not know in this tenant (not yet connected, or another tenant's) is
   * judged by its id alone: no labels, no facts.
   */

  private hostFor(tenant: string, id: string): HostRecord {
    const h = this.deps.inventory.get(id);
    if (h && h.tenant === tenant) return h;
    return { id, tenant, region: "", proxy: "", connected: false, since: 0, labels: {} };
  }

  /** Writes an audit event; a failure to write is logged and, for refusals, never hides the refusal. */
  private async record(caller: PeerIdentity | undefined, kind: string, outcome: { decision: AuditDecision; reason: string }, more: Pick<AuditInput, "what" | "hostIds" | "jobId">): Promise<void> {
    const tenant = caller && caller.role !== "proxy" && caller.role !== "controller" ? caller.scope : "";
    const via = caller?.via === "console" ? `${outcome.reason ? " " : ""}(web console)` : "";
    const input: AuditInput = { kind, tenant, actor: caller ? formatIdentity(caller) : "unidentified", ...outcome, reason: `${outcome.reason}${via}`, ...more };
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

/** The same certificate identity (role, tenant, id). */

/** What a request runs, for the audit log: steps, or a document and the NAMES of its parameters (values may be sensitive). */
export function describeRequest(req: Pick<SubmitRequest, "document" | "documentContent" | "steps" | "parameters">): string {
  if (req.documentContent) return `inline document ${JSON.stringify(req.documentContent)}`;
  if (!req.document) return describeSteps(req.steps);
  const names = Object.keys(req.parameters ?? {});
  return `document ${req.document}${names.length ? ` (parameters given: ${names.join(", ")})` : ""}`;
}

/** Redacted parameters as `k=v` words. */
function describeParams(params: Record<string, string>): string {
  return Object.entries(params).map(([k, v]) => `${k}=${quoteArg(v)}`).join(" ");
}

export function describeTarget(req: Pick<SubmitRequest, "target" | "allHosts" | "hostIds">): string {
  if (req.target !== undefined) return `target ${JSON.stringify(req.target)}`;
  if (req.allHosts) return "all hosts";
  return `hosts ${req.hostIds.slice(0, 10).join(",")}${req.hostIds.length > 10 ? ",…" : ""}`;
}

/** Steps as an operator would recognise them: argv for exec, the script for shell. */
function describeSteps(steps: readonly Step[]): string {
  return steps
    .map((s) => {
      switch (s.tool.case) {
        case "exec":
          return `exec ${s.tool.value.argv.map(quoteArg).join(" ")}`;
        case "shell":
          return `shell ${JSON.stringify(s.tool.value.script)}`;
        case "script":
          return `script ${s.tool.value.artifact}`;
        case "filePut":
          return `file.put ${s.tool.value.artifact} to ${JSON.stringify(s.tool.value.baseDir)}/${JSON.stringify(s.tool.value.path)}`;
        case "update":
          return `update to ${releaseVersion(s.tool.value.releases)}`;
        case "python": {
          const t = s.tool.value;
          return `python ${t.artifact || JSON.stringify(t.script)}${t.args.map((a) => " " + quoteArg(a)).join("")}`;
        }
        case "ansible": {
          const t = s.tool.value;
          const what = t.module ? `module ${t.module} ${JSON.stringify(t.moduleArgs)}` : t.artifact ? `playbook ${t.artifact}` : `playbook ${JSON.stringify(t.playbook)}`;
          return `ansible ${what}${Object.keys(t.vars).length > 0 ? ` vars ${JSON.stringify(t.vars)}` : ""}`;
        }
        default:
          return `tool ${s.tool.case ?? "none"}`;
      }
    })
    .join("; ");
}

function quoteArg(a: string): string {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(a) ? a : JSON.stringify(a);
}

/** What a session runs, for the audit log. */
export function describeSession(spec: SessionSpec): string {
  if (spec.forward) return `port forward to ${spec.forward.host.includes(":") ? `[${spec.forward.host}]` : spec.forward.host}:${spec.forward.port}`;
  const program = spec.argv.length === 0 ? "login shell" : spec.argv.map(quoteArg).join(" ");
  return `${program}${spec.tty ? " (tty)" : ""}`;
}

export function describeLabels(set: Record<string, string>, remove: readonly string[]): string {
  const parts = [...remove.map((k) => `-${k}`), ...Object.entries(set).map(([k, v]) => `${k}=${quoteArg(v)}`)];
  return `labels ${parts.join(" ")}`;
}

/** The version a step's releases name, for the audit log and listings. */
function releaseVersion(releases: readonly SignedRelease[]): string {
  try {
    return releases.length > 0 ? `${manifestOf(releases[0]!).version} (${releases.map((r) => manifestOf(r).platform).join(", ")})` : "(no release)";
  } catch {
    return "(a malformed release)";
  }
}
