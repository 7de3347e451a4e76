import { LmdbScheduleStore, Scheduler } from "./schedules.js";
import { LmdbTriggerStore } from "./trigger-store.js";
import { TriggerEvaluator } from "./triggers.js";
import { TriggerAccess } from "./trigger-access.js";
import { triggerServiceImpl } from "./trigger-api.js";
import { EventIntake } from "./event-intake.js";
import { LIMITS } from "../common/limits.js";
import { TriggerService } from "../gen/rexmesh/v1/trigger_pb.js";
import type { AddressInfo } from "node:net";
import { readCredentials } from "../certs/files.js";
import { systemClock, type Clock, type Timer } from "../common/clock.js";
import { requireFiles, type Resolved, type Schema } from "../common/config.js";
import { serveFrameLink } from "../common/connect-link.js";
import { callerOf, createRpcServer, respondsInBinary } from "../common/connect-server.js";
import { ConfigError } from "../common/errors.js";
import { timeOrderedIds } from "../common/ids.js";
import { parseHostPort, type Service } from "../common/lifecycle.js";
import type { Logger } from "../common/logger.js";
import { ControllerService } from "../gen/rexmesh/v1/controller_pb.js";
import { ProxyLinkService, type ProxyLoad } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { controllerServiceImpl } from "./api.js";
import { OperatorAccess } from "./access.js";
import { AuditLog, LmdbAuditStore } from "./audit.js";
import { Authorizer } from "./authz.js";
import { BundleService } from "./bundles.js";
import { TASK_KEY_LIFETIME_MS, TaskSigner } from "../common/task-signing.js";
import { EndKeyRing, LmdbEndKeyStore } from "./end-keys.js";
import { Revocations } from "./revocation.js";
import { revocationServiceImpl } from "./revocation-api.js";
import { RevocationService } from "../gen/rexmesh/v1/revocation_pb.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { healthServiceImpl, HealthState } from "../common/health.js";
import { Metrics } from "../common/metrics.js";
import { jobMetrics } from "./job-metrics.js";
import { reflectionServiceImpl } from "../common/reflection.js";
import { ServerReflection } from "../gen/grpc/reflection/v1/reflection_pb.js";
import { Inventory } from "./inventory.js";
import { CONTROLLER_DECLARATIONS, ENROLL_LISTENER_DECLARATIONS } from "./declarations.js";
import type { DescMethod } from "@bufbuild/protobuf";
import { withRequestLimits } from "./request-limits.js";
import { LmdbEnv } from "../common/lmdb.js";
import { LmdbJobStore } from "./lmdb-job-store.js";
import { JobManager } from "./jobs.js";
import { DocumentStore, LmdbDocumentBackend } from "./document-store.js";
import { serveProxyLink } from "./proxy-link.js";
import { tasksAsWire } from "./signed-task-wire.js";
import { SessionBroker, type ProxySessionLink } from "./sessions.js";
import { LmdbRecordingStore } from "./recordings.js";
import { existsSync, readFileSync } from "node:fs";
import type { ServiceImpl } from "@connectrpc/connect";
import type { Credentials } from "../certs/files.js";
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import type { Call, Grant } from "../common/rpc-access.js";
import { ConsoleService } from "../gen/rexmesh/v1/console_pb.js";
import { consoleServiceImpl } from "./console-api.js";
import { createConsoleServer, consoleStaticDir } from "./console-server.js";
import { ConsoleSessions } from "./console-sessions.js";
import { createPublicKey } from "node:crypto";
import type { CaMaterial } from "../certs/ca.js";
import { createOpenUnaryServer } from "../common/open-unary-server.js";
import { EnrollService, TokenService } from "../gen/rexmesh/v1/enroll_pb.js";
import { enrollAnonymous, enrollServiceImpl, EnrollmentAuthority, tokenServiceImpl } from "./enroll.js";
import { LmdbEnrollStore } from "./enroll-store.js";
import { ArtifactService } from "../gen/rexmesh/v1/artifact_pb.js";
import { ArtifactStore, artifactServiceImpl } from "./artifacts.js";
import { ReleaseStore } from "./releases.js";
import { join } from "node:path";
import { HostKeyVerifier } from "../common/host-signing.js";
import { lmdbReportKeyStore } from "./report-keys.js";

/** Above this share of --store-size, sessions are no longer recorded (jobs are refused above 90%). */
const RECORDING_STORE_SHARE = 0.75;
/** How often the controller looks whether its task-signing key is due for renewal (at half its lifetime). */
const SIGNING_KEY_CHECK_MS = 3_600_000;

export const controllerSchema = {
  listen: { type: "string", default: "127.0.0.1:7443", doc: "address for the public API and proxy links (host:port; port 0 picks one)" },
  cert: { type: "string", doc: "controller certificate (PEM)" },
  key: { type: "string", doc: "controller private key (PEM)" },
  ca: { type: "string", doc: "mesh CA certificate (PEM)" },
  data: { type: "string", default: "rexmesh-data/controller", doc: "directory of the controller's LMDB store (jobs, tasks, output, inventory)" },
  storeSize: { type: "int", default: 8 * 1024 ** 3, min: 1 << 20, doc: "bytes the store may hold; new jobs are refused (RESOURCE_EXHAUSTED) above 90% of it" },
  heartbeat: { type: "duration", default: "10s", doc: "heartbeat interval on proxy links" },
  metricsListen: { type: "string", doc: "address for Prometheus metrics over plain HTTP (GET /metrics); off when unset" },
  deliveryDeadline: { type: "duration", default: "1h", doc: "delivery deadline of jobs that set none" },
  lostAfter: { type: "duration", default: "15m", doc: "a task whose host stays unreachable this long ends LOST (jobs may set their own)" },
  cancelGrace: { type: "duration", default: "10s", doc: "after a cancel, how long a reachable host has to confirm before the controller ends the task itself" },
  grace: { type: "duration", default: "10s", doc: "time allowed for a graceful stop" },
  readyFile: { type: "string", doc: "file written with the listening address once running" },
  logLevel: { type: "string", default: "info", doc: "debug, info, warn or error" },
  caKey: { type: "string", doc: "mesh CA private key (PEM); needed to enroll hosts (docs/enrollment.md)" },
  hostCertTtl: { type: "duration", default: "24h", doc: "lifetime of host certificates issued by enrollment" },
  sessions: { type: "bool", default: false, doc: "serve interactive sessions (rexmesh shell); off by default: read docs/sessions.md, Known gaps, before turning them on" },
  sessionIdle: { type: "duration", default: "30m", doc: "a session ends after this long without input from the client, unless the role that allowed it sets sessionIdle (0: never)" },
  sessionRecordingMax: { type: "int", default: 1024 ** 3, min: 0, doc: "bytes of one session's recording at most (both ways together); past it the recording is cut, and a role with strictRecording ends the session" },
  sessionMax: { type: "duration", default: "12h", doc: "a session ends after this long in all, unless the role that allowed it sets sessionMax (0: never)" },
  sessionResume: { type: "duration", default: "30s", doc: "how long a session whose leg was cut (its proxy restarted, its host failed over) waits for its host to come back before it ends (0: a cut ends it)" },
  enrollListen: { type: "string", doc: "extra address serving only EnrollService without asking for a client certificate, for daemons with a join token that reach the controller directly (host:port; port 0 picks one); off by default" },
  consoleListen: { type: "string", doc: "address of the web console's HTTPS listener (host:port; port 0 picks one; docs/console.md); off when unset" },
  consoleUrl: { type: "string", doc: "the console's address as browsers reach it, for the links rexmesh console prints (default: https://<the address --console-listen bound>)" },
  consoleCert: { type: "string", doc: "certificate (PEM) the console shows browsers (default: the controller's own, signed by the mesh CA)" },
  consoleKey: { type: "string", doc: "private key of --console-cert (PEM)" },
  consoleSession: { type: "duration", default: "8h", doc: "how long a console login lasts (sessions are kept in memory: a restart logs every browser out)" },
  policy: { type: "string", doc: "authorization policy file (YAML or JSON, docs/authorization.md), reloaded on SIGHUP; without one every operator has full access within its tenant" },
} satisfies Schema;

export type ControllerConfig = Resolved<typeof controllerSchema>;

/** Wires the controller's parts together and starts serving. */
export async function startController(config: ControllerConfig, log: Logger, clock: Clock = systemClock): Promise<Service & { address: AddressInfo; served: readonly DescMethod[] }> {
  const creds = readCredentials(requireFiles(config));
  const { host, port } = parseHostPort(config.listen, "listen");
  const env = new LmdbEnv({ path: config.data, maxBytes: config.storeSize });
  const store = new LmdbJobStore(env);
  const inventory = new Inventory(env.db("hosts"), clock.now(), (err, host) => log.error("storing a host record failed", { host, err }));
  const ids = timeOrderedIds(clock);
  const documents = new DocumentStore(new LmdbDocumentBackend(env), clock);
  // The X25519 keys daemons agree their end MACs with, kept across restarts (controller/end-keys.ts).
  const endKeys = await EndKeyRing.open(new LmdbEndKeyStore(env), clock, { log });
  // Tasks are signed with a key endorsed by this controller's certificate; daemons verify before running. It carries the current X25519 key.
  const signer = new TaskSigner(creds, clock, TASK_KEY_LIFETIME_MS, endKeys.current.publicKey);
  const revocations = new Revocations(env.db("revoked"), creds, clock, log);
  const revokedHost = (host: { id: string; tenant: string }) => revocations.revocationOf({ role: "host", scope: host.tenant, id: host.id })?.reason;
  // Hosts' report keys: presence proofs and signed task ends are checked against them (common/host-signing.ts).
  const hostKeys = new HostKeyVerifier(creds.caPem, clock, (host) => revocations.isRevoked(host), lmdbReportKeyStore(env, log), { controllerKeys: (id) => endKeys.get(id) });
  const metrics = new Metrics();
  const jobs = new JobManager({
    store,
    inventory,
    clock,
    ids,
    log,
    defaultDeliveryDeadlineMs: config.deliveryDeadline,
    defaultLostAfterMs: config.lostAfter,
    cancelGraceMs: config.cancelGrace,
    documents,
    checkEnd: (status, host) => hostKeys.checkEnd(status, host),
    observe: jobMetrics(metrics),
    revoked: (host) => {
      const r = revokedHost(host);
      return r && `host ${host.id} is revoked: ${r}`;
    },
  });
  const bundles = new BundleService({ jobs, inventory, creds, clock, ids, log, signer, isRevoked: (peer) => revocations.isRevoked(peer), acceptReportKey: (key, host) => hostKeys.accept(key, host).ok,
    events: {
      receive: (evs, from) => eventsRef!.receive(evs, from),
      storedFor: (tenant, region) => eventsRef!.storedFor(tenant, (hostId) => inventory.get(hostId)?.region === region),
    },
  });
  let eventsRef: EventIntake | undefined;
  jobs.start();
  const authz = new Authorizer({ policyFile: config.policy, log });
  const audit = new AuditLog({ store: new LmdbAuditStore(env.db("audit")), clock, ids });
  const artifacts = new ArtifactStore(join(config.data, "artifacts"));
  const releases = new ReleaseStore(env.db("releases"), artifacts);
  const recordings = new LmdbRecordingStore(env.db("sessions"), env.db("session-recordings"));
  // Schedules: each firing is its creator's submit through `access`, which therefore comes first.
  const scheduleStore = new LmdbScheduleStore(env);
  let accessRef: OperatorAccess | undefined;
  const scheduler = new Scheduler({
    clock,
    store: scheduleStore,
    log: log.child({ component: "schedules" }),
    fire: (rec, _at, key, by) => accessRef!.fireSchedule(rec, key, by),
    running: (jobId) => {
      const job = jobs.getJobRecord(jobId);
      return job !== undefined && job.finishedAt === undefined;
    },
  });
  const access = new OperatorAccess({ authz, audit, jobs, inventory, log, documents, artifacts, revocations, bundles, recordings, schedules: { store: scheduleStore, scheduler, clock } });
  accessRef = access;
  // Triggers: each firing is its creator's submit through `access`, as a schedule's is.
  const triggerStore = new LmdbTriggerStore(env, { maxEvents: LIMITS.eventsKept, retentionMs: LIMITS.eventRetentionMs, now: () => clock.now() });
  let triggersRef: TriggerAccess | undefined;
  const evaluator = new TriggerEvaluator({ clock, store: triggerStore, log: log.child({ component: "triggers" }), fire: (rec, event, key) => triggersRef!.fire(rec, event, key) });
  const triggers = new TriggerAccess({ access, store: triggerStore, evaluator, inventory, clock, documents });
  triggersRef = triggers;
  const evaluate = () => void evaluator.wake().catch((err: unknown) => log.error("evaluating events failed", { err }));
  // SIGHUP reloads the policy (the usual daemon convention). Installed here, not in
  // runService, because only the controller has something to reload; a listener
  // also replaces Node's default of exiting on SIGHUP. Removed on stop.
  const onHangup = () => void authz.reload();
  const enrollment = new EnrollmentAuthority({
    store: new LmdbEnrollStore(env),
    ca: readCaKey(config.caKey, creds.caPem),
    clock,
    log,
    hostCertTtlMs: config.hostCertTtl,
    knownHost: (id) => inventory.get(id),
    isRevoked: (identity) => revocations.isRevoked(identity),
    authorizeRekey: (caller) => authz.require(caller, { action: "rekey" }),
    audit: (e) =>
      audit
        .append({
          kind: e.action,
          tenant: e.tenant ?? "",
          actor: e.caller,
          decision: e.decision === "allowed" ? "allowed" : "denied",
          reason: e.reason,
          what: [
            e.credential,
            e.rekey && `re-key${e.previousKeyFingerprint ? ` (previous key ${e.previousKeyFingerprint.slice(0, 16)})` : ""}`,
            e.relayedBy && `relayed by proxy ${e.relayedBy}`,
            e.serial && `certificate ${e.serial}`,
          ]
            .filter(Boolean)
            .join(", "),
          hostIds: e.hostId ? [e.hostId] : [],
        })
        .then(() => undefined),
  });
  const outputBytes = metrics.counter("output_bytes_total", "output bytes received from proxies, by region", ["region"]);
  const tasksEnded = metrics.counter("tasks_ended_total", "tasks that reached a terminal state, by state and region", ["state", "region"]);
  const counters = {
    outputBytes: (bytes: number, region: string) => outputBytes.inc({ region }, bytes),
    tasksEnded: (state: string, region: string) => tasksEnded.inc({ region, state }),
  };
  metrics.gauge("hosts", "hosts known, by region and connection", () => {
    const n = new Map<string, number>();
    for (const h of inventory.all()) n.set(`${h.region}\0${h.connected}`, (n.get(`${h.region}\0${h.connected}`) ?? 0) + 1);
    return [...n].map(([k, value]) => ({ labels: { region: k.split("\0")[0]!, connected: k.split("\0")[1]! }, value }));
  }, ["region", "connected"]);
  metrics.gauge("store_used_bytes", "bytes in use in the controller's LMDB store", () => env.usedBytes());
  const loads = new Map<string, { region: string; load: ProxyLoad }>();
  metrics.gauge("proxy_connected_hosts", "hosts each connected proxy holds, as it last reported", () =>
    [...loads].map(([proxy, l]) => ({ labels: { proxy, region: l.region }, value: l.load.connectedHosts })),
    ["proxy", "region"],
  );
  metrics.gauge("proxy_queued_tasks", "tasks waiting at each connected proxy", () => [...loads].map(([proxy, l]) => ({ labels: { proxy, region: l.region }, value: l.load.queuedTasks })), ["proxy", "region"]);
  metrics.gauge("proxy_running_tasks", "tasks running behind each connected proxy", () => [...loads].map(([proxy, l]) => ({ labels: { proxy, region: l.region }, value: l.load.runningTasks })), ["proxy", "region"]);
  const eventsRefused = metrics.counter("events_refused_total", "hosts' events dropped at intake, by reason: signature (forged or altered on the way, or its report key expired), too old (signed before the ids kept), rate (past its host's rate)", ["reason"]);
  const events = new EventIntake({
    store: triggerStore,
    clock,
    log: log.child({ component: "events" }),
    checkEvent: (e) => hostKeys.checkEvent(e),
    acceptKey: (key, host) => hostKeys.accept(key, host),
    stored: evaluate,
    refused: (reason) => eventsRefused.inc({ reason }),
  });
  eventsRef = events;
  const linkDeps = { jobs, inventory, clock, log, heartbeatMs: config.heartbeat, signer, revocations, counters, loads, hostKeys, events };
  const sessionBytes = metrics.counter("session_bytes_total", "bytes of sessions and port forwards relayed, by direction (to_host: typed, piped, sent; from_host: output, received)", ["direction"]);
  const sessions = new SessionBroker({
    clock,
    ids,
    signer,
    log,
    hostKeys,
    idleMs: config.sessionIdle,
    maxMs: config.sessionMax,
    resumeMs: config.sessionResume,
    meter: (direction, bytes) => sessionBytes.inc({ direction }, bytes),
    recordings: {
      store: recordings,
      maxBytes: config.sessionRecordingMax,
      // Recordings stop well before jobs are refused (90%): a big session must not take the store from every tenant's work.
      room: () => (env.usedBytes() > config.storeSize * RECORDING_STORE_SHARE ? `the controller's store is over ${RECORDING_STORE_SHARE * 100}% full` : undefined),
    },
    portOf: (host) => jobs.proxyPort(host.proxy),
    isRevoked: (peer) => revocations.isRevoked(peer),
  });
  metrics.gauge("sessions_open", "sessions (rexmesh shell, run --stdin -) and port forwards relayed now, by kind", () => Object.entries(sessions.openByKind()).map(([kind, value]) => ({ labels: { kind }, value })), ["kind"]);
  const stopEndingRevokedSessions = revocations.onChange(() => sessions.revoked());
  const health = new HealthState([ControllerService.typeName, ProxyLinkService.typeName]);
  const controllerImpl = withRequestLimits(controllerServiceImpl({ jobs, access, sessions: config.sessions ? sessions : undefined, revoked: revokedHost, scheduler, releases, now: () => clock.now(), log }), { callerOf, log });
  const consoleSessions = new ConsoleSessions(clock, { sessionTtlMs: config.consoleSession });
  const stopEndingRevokedConsoles = revocations.onChange(() => consoleSessions.endAllOf((peer) => revocations.isRevoked(peer)));
  const decide = (call: Call) => access.decideCall(call);
  const consoleListener = config.consoleListen ? await startConsole(config, { creds, sessions: consoleSessions, controllerImpl, decide, isRevoked: (peer) => revocations.isRevoked(peer), authz, audit, log, clock }) : undefined;
  // One boundary for every call: controller/declarations.ts says what each method needs, OperatorAccess decides and audits.
  const server = createRpcServer({
    creds,
    log,
    isRevoked: (peer) => revocations.isRevoked(peer),
    declarations: CONTROLLER_DECLARATIONS,
    decide,
    routes: (router) => {
      router.service(RevocationService, revocationServiceImpl(access));
      router.service(Health, healthServiceImpl(health));
      router.service(ServerReflection, reflectionServiceImpl([ControllerService, TriggerService, ProxyLinkService, RevocationService, TokenService, ArtifactService, EnrollService, Health]));
      router.service(ControllerService, controllerImpl);
      router.service(ConsoleService, consoleServiceImpl({ sessions: consoleSessions, baseUrl: consoleListener?.url }));
      router.service(EnrollService, enrollServiceImpl(enrollment, callerOf));
      router.service(TokenService, tokenServiceImpl(enrollment, callerOf));
      router.service(ArtifactService, artifactServiceImpl({ store: artifacts, log }));
      router.service(TriggerService, triggerServiceImpl({ triggers }));
      router.service(ProxyLinkService, {
        // A binary stream's tasks are encoded by hand as each frame leaves (controller/signed-task-wire.ts).
        proxyStream: (requests, ctx) => serveFrameLink(requests, ctx, (link, peer) => serveProxyLink(linkDeps, link, peer), respondsInBinary(ctx) ? tasksAsWire : undefined),
        proxySession: (requests, ctx) => serveFrameLink(requests, ctx, (link: ProxySessionLink, peer) => sessions.serveLeg(link, peer)),
      });
    },
  });
  const address = await server.listen(host, port);
  let enrollServer: ReturnType<typeof createOpenUnaryServer> | undefined;
  let enrollAddress: string | undefined;
  if (config.enrollListen) {
    const e = parseHostPort(config.enrollListen, "enrollListen");
    ENROLL_LISTENER_DECLARATIONS.requireDeclared([EnrollService.method.enroll]);
    enrollServer = createOpenUnaryServer({ creds, log, handlers: [{ method: EnrollService.method.enroll, handle: (req) => enrollAnonymous(enrollment, req) }] });
    enrollAddress = `${e.host}:${await enrollServer.listen(e.host, e.port)}`;
  }
  process.on("SIGHUP", onHangup);
  // Firings missed while the controller was down are handled now, by each schedule's misfire policy.
  scheduler.start();
  // Events stored but not evaluated when the controller stopped are evaluated now, once.
  evaluate();
  const metricsServer = await metrics.serveAt(config.metricsListen);
  // The task-signing key is renewed at half its lifetime, so that a controller that runs for months is not
  // refused by its daemons when the key it started with expires (TaskSigner.renewIfDue); looked at hourly.
  let renewTimer: Timer | undefined;
  const renewSigningKey = () => {
    if (signer.renewIfDue()) log.info("task-signing key renewed", { key: signer.key.keyId });
    renewTimer = clock.setTimeout(renewSigningKey, SIGNING_KEY_CHECK_MS);
  };
  renewSigningKey();
  return {
    address,
    served: server.served,
    info: { role: "controller", address: `${address.address}:${address.port}`, ...(enrollAddress ? { enrollAddress } : {}), ...(metricsServer ? { metricsAddress: metricsServer.address } : {}), ...(consoleListener ? { consoleAddress: consoleListener.address, consoleUrl: consoleListener.url } : {}) },
    draining: () => health.draining(),
    async stop(graceMs) {
      process.off("SIGHUP", onHangup);
      renewTimer?.cancel();
      stopEndingRevokedSessions();
      stopEndingRevokedConsoles();
      scheduler.stop();
      evaluator.stop();
      // One grace for the whole stop: what the drain used is not given again to the servers.
      const until = Date.now() + graceMs;
      await jobs.drain(graceMs);
      await metricsServer?.close();
      const left = Math.max(0, until - Date.now());
      await Promise.all([server.close(left), enrollServer?.close(left), consoleListener?.server.close(left)]);
      jobs.stop();
      await store.close();
    },
  };
}

/**
 * The web console's listener (controller/console-server.ts): the same
 * ControllerService handlers and boundary as the main port, the caller
 * taken from a session cookie. Listens before the main port does, so that
 * the links CreateConsoleLink prints name the address it got.
 */
async function startConsole(
  config: ControllerConfig,
  deps: {
    creds: Credentials;
    sessions: ConsoleSessions;
    controllerImpl: ServiceImpl<typeof ControllerService>;
    decide: (call: Call) => Promise<Grant>;
    isRevoked: (peer: PeerIdentity) => boolean;
    authz: Authorizer;
    audit: AuditLog;
    log: Logger;
    clock: Clock;
  },
): Promise<{ server: ReturnType<typeof createConsoleServer>; address: string; url: string }> {
  const at = parseHostPort(config.consoleListen!, "consoleListen");
  if (Boolean(config.consoleCert) !== Boolean(config.consoleKey)) throw new ConfigError("consoleCert and consoleKey go together");
  const tls = config.consoleCert ? { certPem: readFileSync(config.consoleCert, "utf8"), keyPem: readFileSync(config.consoleKey!, "utf8") } : deps.creds;
  const staticDir = consoleStaticDir(import.meta.url);
  if (!existsSync(join(staticDir, "index.html"))) deps.log.warn("the web console's files are not built (npm run build): the console serves its API only", { staticDir });
  const server = createConsoleServer({
    tls,
    staticDir,
    sessions: deps.sessions,
    // Not Session and Forward: a browser cannot hold a bidirectional stream, and a cookie should not open shells.
    routes: (router) => void router.service(ControllerService, withoutSessions(deps.controllerImpl)),
    declarations: CONTROLLER_DECLARATIONS,
    decide: deps.decide,
    isRevoked: deps.isRevoked,
    holdsConsole: (peer) => deps.authz.holds(peer, "console").allowed,
    allowedHosts: () => hosts,
    audit: async (kind, peer, reason, decision = "allowed") => {
      await deps.audit.append({ kind, tenant: peer.scope, actor: formatIdentity(peer), decision, reason, what: "web console session", hostIds: [] });
    },
    log: deps.log.child({ component: "console" }),
    clock: deps.clock,
  });
  let hosts: string[] = [];
  const bound = await server.listen(at.host, at.port);
  const address = `${bound.family === "IPv6" ? `[${bound.address}]` : bound.address}:${bound.port}`;
  const url = (config.consoleUrl ?? `https://${address}`).replace(/\/+$/, "");
  // The names browsers may use: the one in the links (--console-url), and the address bound.
  hosts = [...new Set([new URL(url).host, address, ...(bound.port === 443 ? [new URL(url).hostname] : [])].map((h) => h.toLowerCase()))];
  return { server, address, url };
}

/** ControllerService without the calls that open sessions and port forwards (they answer UNIMPLEMENTED). */
function withoutSessions(impl: ServiceImpl<typeof ControllerService>): Partial<ServiceImpl<typeof ControllerService>> {
  const { session: _session, forward: _forward, ...rest } = impl;
  return rest;
}

/** The CA key, checked against the CA certificate so that a wrong file fails at start, not at the first enrollment. */
function readCaKey(path: string | undefined, caPem: string): CaMaterial | undefined {
  if (!path) return undefined;
  let keyPem: string;
  try {
    keyPem = readFileSync(path, "utf8");
  } catch (cause) {
    throw new ConfigError(`caKey: cannot read ${path}`, { cause });
  }
  let matches = false;
  try {
    const fromKey = createPublicKey(keyPem).export({ type: "spki", format: "der" });
    const fromCert = createPublicKey(caPem).export({ type: "spki", format: "der" });
    matches = fromKey.equals(fromCert);
  } catch (cause) {
    throw new ConfigError(`caKey: ${path} is not a PEM private key`, { cause });
  }
  if (!matches) throw new ConfigError(`caKey: ${path} is not the key of the CA certificate (--ca)`);
  return { certPem: caPem, keyPem };
}
