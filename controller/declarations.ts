/**
 * What every RPC the controller serves needs (common/rpc-access.ts): the
 * policy action and scope for operators, the certificate role for other
 * mesh identities, or why it is open. The server refuses to start when it
 * serves a method that is not declared here, and TypeScript refuses a
 * service here with a method left out. docs/authorization.md has the same
 * table in words; test/unit/declarations.test.ts checks both.
 */
import { DeclarationTable } from "../common/rpc-access.js";
import { ServerReflection } from "../gen/grpc/reflection/v1/reflection_pb.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { ArtifactService } from "../gen/rexmesh/v1/artifact_pb.js";
import { ControllerService } from "../gen/rexmesh/v1/controller_pb.js";
import { ConsoleService } from "../gen/rexmesh/v1/console_pb.js";
import { EnrollService, TokenService } from "../gen/rexmesh/v1/enroll_pb.js";
import { ProxyLinkService } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { RevocationService } from "../gen/rexmesh/v1/revocation_pb.js";
import { TriggerService } from "../gen/rexmesh/v1/trigger_pb.js";
import { describeLabels, describeRequest, describeTarget } from "./access.js";
import { revokeAction, type Action } from "./authz.js";

/**
 * Decided on the hosts the request resolves to, by controller/access.ts,
 * which audits it; `summary` words a refusal at the boundary for the audit log.
 */
const onResolvedHosts = <Req>(action: Action, summary?: (request: Req) => { what: string; hostIds?: string[] }) => ({
  operator: { action, scope: "hosts" as const },
  auditedBy: "service" as const,
  ...(summary ? { summary } : {}),
});
/** Decided at the boundary for the caller's tenant as a whole. */
const inTenant = (action: Action) => ({ operator: { action, scope: "tenant" as const } });

/** The controller's main port (mutual TLS). */
export const CONTROLLER_DECLARATIONS = new DeclarationTable()
  .service(ControllerService, {
    listHosts: onResolvedHosts("read", (req) => ({ what: req.target ? `list hosts ${JSON.stringify(req.target)}` : "list hosts" })),
    listHostTasks: onResolvedHosts("read", (req) => ({ what: `host queue ${req.hostId}`, hostIds: [req.hostId] })),
    // A schedule's job is authorized as a dry run when it is made, and as its creator's submit each time it fires.
    createSchedule: { ...inTenant("schedule"), summary: (req) => ({ what: `schedule add ${req.schedule?.name ?? ""}: ${JSON.stringify(req.schedule?.cron ?? "")} in ${req.schedule?.timezone || "UTC"}` }) },
    listSchedules: inTenant("read"),
    getSchedule: inTenant("read"),
    pauseSchedule: { ...inTenant("schedule"), summary: (req) => ({ what: `schedule ${req.paused ? "pause" : "resume"} ${req.name}` }) },
    deleteSchedule: { ...inTenant("schedule"), summary: (req) => ({ what: `schedule remove ${req.name}` }) },
    runSchedule: { ...inTenant("schedule"), summary: (req) => ({ what: `schedule run-now ${req.name}` }) },
    // A release is data (the daemons check its signature); sending it to hosts is a job, authorized as one (tool update).
    addRelease: { ...inTenant("release"), summary: () => ({ what: "release add" }) },
    listReleases: inTenant("read"),
    removeRelease: { ...inTenant("release"), summary: (req) => ({ what: `release remove ${req.version}${req.platform ? ` for ${req.platform}` : ""}` }) },
    submitJob: onResolvedHosts("submit", (req) => ({
      what: `${req.dryRun ? "dry run, " : ""}${describeTarget(req)}: ${describeRequest({ ...req, document: req.document || undefined })}`,
      hostIds: req.hostIds,
    })),
    // Each job decided on its own resolved hosts, and audited, by controller/access.ts.
    submitJobs: onResolvedHosts("submit", (req) => ({ what: `submit ${req.jobs.length} jobs` })),
    // Submitted as SubmitJob, then watched as WatchJob: read on the job's hosts too (controller/access.ts).
    submitAndWatch: onResolvedHosts("submit", (req) => ({ what: req.job ? `${describeTarget(req.job)}: ${describeRequest({ ...req.job, document: req.job.document || undefined })}` : "submit and watch" })),
    getJob: onResolvedHosts("read", (req) => ({ what: `get job ${req.jobId}` })),
    watchJob: onResolvedHosts("read"),
    cancelJob: onResolvedHosts("cancel", (req) => ({ what: `cancel job ${req.jobId}${req.hostIds.length ? ` on ${req.hostIds.length} host(s)` : ""}`, hostIds: req.hostIds })),
    // A submit of the earlier job's request on the hosts picked (controller/access.ts), after reading that job.
    rerunJob: onResolvedHosts("submit", (req) => ({ what: `rerun job ${req.jobId}`, hostIds: req.hostIds })),
    listJobs: onResolvedHosts("read", () => ({ what: "list jobs" })),
    exportBundle: onResolvedHosts("bundle", (req) => ({ what: `export bundle of region ${req.region}` })),
    importBundle: onResolvedHosts("bundle", () => ({ what: "import results bundle" })),
    setHostLabels: onResolvedHosts("label", (req) => ({ what: describeLabels(req.set, req.remove), hostIds: [req.hostId] })),
    listAudit: inTenant("audit"),
    putDocument: inTenant("document"),
    getDocument: inTenant("read"),
    listDocuments: inTenant("read"),
    // The host is in the stream's first message: decided and audited by controller/access.ts (openSession).
    session: onResolvedHosts("session"),
    forward: onResolvedHosts("forward"),
    // What an operator typed and saw is the audit trail's: the same action as the audit log.
    listSessions: inTenant("audit"),
    getSessionRecording: inTenant("audit"),
    joinSession: inTenant("audit"),
  })
  .service(ConsoleService, {
    // A browser session acts as its operator, no more: the link needs its own action so a policy can keep
    // operators to the CLI. Served on this port only, never to a console session (docs/console.md).
    createConsoleLink: { ...inTenant("console"), summary: () => ({ what: "console link" }) },
  })
  .service(TriggerService, {
    // Events are shown for the hosts the caller's read roles cover (controller/trigger-access.ts).
    listEvents: inTenant("read"),
    // A trigger's job is authorized as its creator's submit each time an event fires it (docs/triggers.md).
    createTrigger: { ...inTenant("trigger"), summary: (req) => ({ what: `trigger add ${req.trigger?.name ?? ""}: on ${JSON.stringify(req.trigger?.on ?? "")}` }) },
    listTriggers: inTenant("read"),
    getTrigger: inTenant("read"),
    pauseTrigger: { ...inTenant("trigger"), summary: (req) => ({ what: `trigger ${req.paused ? "pause" : "resume"} ${req.name}` }) },
    deleteTrigger: { ...inTenant("trigger"), summary: (req) => ({ what: `trigger remove ${req.name}` }) },
  })
  .service(TokenService, {
    // A token bound to a host id is decided on that host. An unbound one lets any new host id join the tenant,
    // where other operators' jobs may reach it: it needs a role with the action on all of the tenant's hosts.
    createJoinToken: {
      operator: { action: "token", scope: "hosts", hostsOf: (req) => (req.hostId ? [req.hostId] : "all") },
      summary: (req) => ({ what: `create join token${req.hostId ? ` bound to ${req.hostId}` : ""}, ${req.uses || 1} use(s)` }),
    },
  })
  .service(RevocationService, {
    revoke: {
      operator: {
        action: (req) => revokeAction(req.role),
        actions: ["revoke", "revoke.operator", "revoke.proxy", "token"],
        scope: "hosts",
      },
      auditedBy: "service",
      summary: (req) => ({ what: `revoke ${req.role} ${req.scope ? `${req.scope}/` : ""}${req.id}`, hostIds: req.role === "host" ? [req.id] : [] }),
    },
    listRevoked: inTenant("read"),
  })
  .service(ArtifactService, {
    putArtifact: inTenant("artifact.write"),
    getArtifact: {
      operator: { action: "artifact.read", scope: "tenant" },
      peer: { roles: ["proxy"], action: "artifact.read", scope: "any artifact, for the hosts of every tenant in its region" },
    },
  })
  .service(EnrollService, {
    enroll: {
      peer: { roles: ["enroll", "proxy"], action: "enroll", scope: "the bootstrap credential in the request, decided and audited by controller/enroll.ts" },
      auditedBy: "service",
    },
  })
  .service(ProxyLinkService, {
    proxyStream: { peer: { roles: ["proxy"], action: "link", scope: "its own name and region: the hello must match the certificate (controller/proxy-link.ts)" } },
    proxySession: { peer: { roles: ["proxy"], action: "session.relay", scope: "a session ordered from this proxy: the first message must name one (controller/sessions.ts)" } },
  })
  .service(Health, {
    check: { open: "health checks, for load balancers and probes; reveal nothing but serving status" },
    watch: { open: "health checks, for load balancers and probes; reveal nothing but serving status" },
  })
  .service(ServerReflection, {
    serverReflectionInfo: inTenant("read"),
  });

/** The optional enroll listener: no client certificate, EnrollService only. */
export const ENROLL_LISTENER_DECLARATIONS = new DeclarationTable().service(EnrollService, {
  enroll: { open: "callers have no certificate yet: the bootstrap credential in the request is decided and audited by controller/enroll.ts" },
});

