import { setMaxListeners } from "node:events";
import { readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { readCredentials, type CredentialPaths } from "../certs/files.js";
import { identityFromCertificate, requireRole, type PeerIdentity } from "../certs/identity.js";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { HostEventSchema } from "../gen/rexmesh/v1/event_pb.js";
import { timeOrderedIds } from "../common/ids.js";
import { readWatchFile, Watchers } from "./watchers.js";
import { systemClock, type Clock } from "../common/clock.js";
import type { Resolved, Schema } from "../common/config.js";
import { IDLE_FRAME_INTERVALS, openGrpcLink } from "../common/grpc-link.js";
import { ConfigError } from "../common/errors.js";
import type { Service } from "../common/lifecycle.js";
import type { Logger } from "../common/logger.js";
import { AgentLinkService } from "../gen/rexmesh/v1/agent_link_pb.js";
import { Agent, type Dialer } from "./agent.js";
import { Executor } from "./executor.js";
import { directLauncherForks } from "./launcher.js";
import { Spawner } from "./spawner.js";
import { collectFacts } from "./facts.js";
import { detectTools } from "./tools.js";
import { LmdbEnv } from "../common/lmdb.js";
import { LmdbBacklog } from "../common/lmdb-backlog.js";
import { LmdbLedger } from "./lmdb-ledger.js";
import { readFileSync } from "node:fs";
import { ensureEnrolled, type BootstrapCredential } from "./enroll.js";
import { keepRenewed } from "./renew.js";
import type { Metrics } from "../common/metrics.js";
import { TaskVerifier } from "../common/task-signing.js";
import { proxyArtifactFetcher } from "./artifact-fetch.js";
import { HostReporter } from "../common/host-signing.js";
import { SessionHost } from "./sessions.js";
import type { ServiceControl } from "../common/lifecycle.js";
import { parseReleaseKeys } from "../common/release.js";
import { EXIT_UPDATE, HEALTH_TIMEOUT_ENV } from "./install.js";
import { Updater, type BadVersion } from "./updates.js";
import { DAEMON_VERSION } from "./version.js";
import { markedScansOf } from "./orphans.js";

export const daemonSchema = {
  proxies: { type: "list", doc: "proxies of this host's region (host:port, comma separated); the next one is tried when one fails" },
  cert: { type: "string", doc: "host certificate (PEM)" },
  key: { type: "string", doc: "host private key (PEM)" },
  ca: { type: "string", doc: "mesh CA certificate (PEM)" },
  identities: { type: "string", doc: "directory of <host>.crt/<host>.key pairs plus ca.crt: one process serves each as a separate host (for dev meshes and labs)" },
  data: { type: "string", default: "rexmesh-data/daemon", doc: "directory of the daemon's LMDB store (ledger of accepted tasks, output not yet delivered)" },
  storeSize: { type: "int", default: 2 * 1024 ** 3, min: 1 << 20, doc: "bytes the store may hold" },
  capacity: { type: "int", default: 4, min: 1, doc: "tasks run at once per host" },
  metricsListen: { type: "string", doc: "address for Prometheus metrics over plain HTTP (GET /metrics); off when unset" },
  renewBefore: { type: "duration", default: "8h", doc: "renew the host certificate this long before it expires (over the link to a proxy)" },
  heartbeat: { type: "duration", default: "10s", doc: "how often the proxy is asked whether it is alive (an HTTP/2 PING; gone after 2 more unanswered); an idle link carries a frame every 12 (at most every 5 minutes)" },
  outputLimit: { type: "int", default: 64 * 1024 * 1024, min: 0, doc: "output bytes kept per task when the job sets no limit" },
  maxUnackedOutput: { type: "int", default: 16 * 1024 * 1024, min: 65536, doc: "output bytes per host not yet acknowledged by the proxy; above it, tasks block in write() until acks arrive" },
  killGrace: { type: "duration", default: "2s", doc: "time between SIGTERM and SIGKILL when a task is stopped" },
  grace: { type: "duration", default: "10s", doc: "time allowed for a graceful stop: running tasks get what is left after --kill-grace and a second for acks, then end INTERRUPTED (at least --kill-grace + 1s)" },
  hostId: { type: "string", doc: "enrollment: this host's id; with --identities DIR, the daemon enrolls when DIR holds no valid certificate for it (docs/enrollment.md)" },
  joinToken: { type: "string", doc: "enrollment: a join token (rexmesh tokens create); prefer REXMESH_JOIN_TOKEN or a config file to keep it out of the process list" },
  enrollCert: { type: "string", doc: "enrollment: a zero certificate (role enroll) to enroll with instead of a token" },
  enrollKey: { type: "string", doc: "enrollment: the zero certificate's key" },
  enrollVia: { type: "list", doc: "enrollment: enroll addresses of proxies (their --enroll-listen) or of the controller, tried in order; --ca is the CA they are verified against" },
  tenant: { type: "string", doc: "enrollment: the tenant to join; the credential must be of it (default: the credential's)" },
  readyFile: { type: "string", doc: "file written once the daemon runs" },
  logLevel: { type: "string", default: "info", doc: "debug, info, warn or error" },
  tools: { type: "list", doc: "extra execution tools to report: NAME (e.g. docker), or python=/path, ansible=/path, pwsh=/path for a program not on PATH (docs/tools.md)" },
  releaseKeys: { type: "string", doc: "release public keys (PEM, one or more) this daemon takes updates signed by (rexmesh release keygen); without, it refuses every update (docs/updates.md)" },
  installRoot: { type: "string", doc: "the install root this daemon runs from, set by its supervisor (rexmesh supervise); updates need it" },
  watch: { type: "string", doc: "a YAML file of watchers (service, command, file, disk) whose events this host reports, for triggers (docs/triggers.md)" },
  hideTools: { type: "list", doc: "execution tools neither reported nor run on this host, e.g. python,ansible (docs/tools.md)" },
  spawner: { type: "bool", default: true, doc: "start tasks' processes from a small spawner process beside the daemon, which keeps the starts and their output's relay off the daemon's event loop (docs/fan-out.md); false: the daemon starts them itself (with posix_spawn, or by forking itself where the native addon was not built)" },
} satisfies Schema;

export type DaemonConfig = Resolved<typeof daemonSchema>;

function identityPaths(config: DaemonConfig): CredentialPaths[] {
  if (config.identities) {
    const dir = config.identities;
    const names = readdirSync(dir).filter((f) => f.endsWith(".crt") && f !== "ca.crt").map((f) => f.slice(0, -4)).sort();
    if (names.length === 0) throw new ConfigError(`identities: no <host>.crt files in ${dir}`);
    return names.map((n) => ({ cert: join(dir, `${n}.crt`), key: join(dir, `${n}.key`), ca: join(dir, "ca.crt") }));
  }
  if (!config.cert || !config.key || !config.ca) throw new ConfigError("cert, key and ca are required (or identities)");
  return [{ cert: config.cert, key: config.key, ca: config.ca }];
}

/**
 * Dials a proxy's AgentLink over grpc-js (docs/transport.md for why grpc-js
 * here). The credentials are read at every dial, so a renewed certificate is
 * used from the next connection on.
 */
function grpcDialer(paths: CredentialPaths, keepaliveMs: number): Dialer {
  return async (address) => openGrpcLink(address, readCredentials(paths), ["proxy"], AgentLinkService.method.agentStream, keepaliveMs);
}

/** Starts one agent per host identity this process serves. */
export async function startDaemon(config: DaemonConfig, log: Logger, clock: Clock = systemClock, control?: ServiceControl): Promise<Service & { agents: Agent[] }> {
  if (!config.proxies || config.proxies.length === 0) throw new ConfigError("proxies is required (--proxies HOST:PORT[,HOST:PORT...])");
  // A stop ends what still runs in time for its process group to be killed and its end to reach the proxy.
  if (config.grace < config.killGrace + 1000) throw new ConfigError(`grace (${config.grace} ms) must be at least killGrace (${config.killGrace} ms) plus 1s, so that a stop can kill what still runs and report its end`);
  if (config.hostId) await enrollIfNeeded(config, log, clock);
  // A watch file with a mistake fails the start, before anything runs.
  const specs = config.watch ? readWatchFile(config.watch) : [];
  const env = new LmdbEnv({ path: config.data, maxBytes: config.storeSize });
  const ledgers = env.db<never>("ledger") as never;
  const outboxes = env.db<Buffer>("outbox", "binary") as never;
  const allPaths = identityPaths(config);
  const updater = new Updater({
    root: config.installRoot,
    releaseKeys: config.releaseKeys ? parseReleaseKeys(readConfigFile(config.releaseKeys, "releaseKeys")) : [],
    version: DAEMON_VERSION,
    platform: `${process.platform}-${process.arch}`,
    hosts: allPaths.length,
    bad: env.db<BadVersion>("bad-versions"),
    clock,
    log,
    // The new version waits for its supervisor's word at least as long as the supervisor gives it.
    verdictWaitMs: Math.max(600_000, Number(process.env[HEALTH_TIMEOUT_ENV] ?? 0) + 60_000),
  });
  await updater.checkProbation();
  const cannotUpdate = updater.unable();
  log.info("daemon version", { version: DAEMON_VERSION, installRoot: config.installRoot, updates: cannotUpdate ?? "yes" });
  const detected = detectTools({ declared: config.tools, hidden: config.hideTools });
  // The update tool is this daemon's own: reported only when it can carry an update out.
  const tools = { ...detected, names: cannotUpdate === undefined && !config.hideTools?.includes("update") ? [...detected.names, "update"] : detected.names };
  const facts = collectFacts(tools.names);
  log.info("execution tools", { tools: tools.names, programs: tools.programs });
  // Fetched artifacts are private temporaries of running steps: any left by a crash are stale.
  rmSync(join(config.data, "artifacts"), { recursive: true, force: true });
  // Metrics (and prom-client, about 10 MB of a daemon's memory) only when something scrapes them.
  const metricsModule = config.metricsListen ? await import("../common/metrics.js") : undefined;
  const metrics: Metrics | undefined = metricsModule ? new metricsModule.Metrics() : undefined;
  const roundTrip = metrics?.histogram("link_round_trip_seconds", "round trip of a ping on this process's links, by the peer at the other end", metricsModule!.ROUND_TRIP_BUCKETS, ["peer"]);
  const sessionHosts: SessionHost[] = [];
  const hostIdentities: PeerIdentity[] = [];
  // One spawner for every host of this process.
  const spawner = config.spawner ? new Spawner({ clock, log: log.child({ component: "spawner" }) }) : undefined;
  spawner?.start();
  // Without a spawner every start is the daemon's own (with one, the spawner's log says how it starts them).
  if (!spawner) log.info("tasks start in the daemon", { with: directLauncherForks === undefined ? "posix_spawn" : `Node's spawn(), a fork of the daemon each: ${directLauncherForks}` });
  const agents = allPaths.map((paths) => {
    const creds = readCredentials(paths);
    const me = requireRole(identityFromCertificate(creds.certPem), "host");
    hostIdentities.push(me);
    // One executor per host: artifacts are fetched through the proxies with this host's own certificate.
    const fetchArtifact = proxyArtifactFetcher({ proxies: config.proxies!, credentials: () => readCredentials(paths), dir: join(config.data, "artifacts", me.id) });
    const executor = new Executor({ clock, defaultOutputLimit: config.outputLimit, killGraceMs: config.killGrace, fetchArtifact, programs: tools.programs, updater, ...(spawner ? { launcher: spawner } : {}) });
    // A new report key whenever the certificate changed (renewal), endorsed by the new one.
    let reporter = { pem: creds.certPem, key: new HostReporter(creds, clock, me) };
    const currentReporter = () => {
      const now = readCredentials(paths);
      if (now.certPem !== reporter.pem) reporter = { pem: now.certPem, key: new HostReporter(now, clock, me) };
      return reporter.key;
    };
    const verifier = new TaskVerifier(creds.caPem, clock);
    const sessions = new SessionHost({
      hostId: me.id,
      tenant: me.scope,
      clock,
      log: log.child({ host: me.id }),
      verifier,
      killGraceMs: config.killGrace,
      dial: (address) => openGrpcLink(address, readCredentials(paths), ["proxy"], AgentLinkService.method.agentSession),
    });
    sessionHosts.push(sessions);
    const agent = new Agent({
      reporter: currentReporter,
      onSessionOrders: (orders, address, reporter) => sessions.orders(orders, address, reporter),
      hostId: me.id,
      tenant: me.scope,
      proxies: config.proxies!,
      // The proxy is asked whether it is alive every heartbeat (an HTTP/2 PING); an idle link carries a frame only every IDLE_FRAME_INTERVALS.
      dial: grpcDialer(paths, config.heartbeat),
      executor,
      ledger: new LmdbLedger(ledgers, me.id),
      verifier,
      outbox: new LmdbBacklog(outboxes, me.id),
      facts,
      tools: tools.names,
      clock,
      log: log.child({ host: me.id }),
      capacity: config.capacity,
      heartbeatMs: config.heartbeat * IDLE_FRAME_INTERVALS,
      pingMs: config.heartbeat,
      ...(roundTrip ? { linkRoundTrip: (s: number) => roundTrip.observe({ peer: "proxy" }, s) } : {}),
      maxUnackedOutputBytes: config.maxUnackedOutput,
      killGraceMs: config.killGrace,
      updates: updater,
      ...(control ? { onRestart: (reason: string) => control.exit(EXIT_UPDATE, reason) } : {}),
    });
    // The supervisor learns that this version came up once it is connected.
    agent.onConnected(() => updater.connected());
    // A session cut by its proxy's restart or a failover resumes through whichever proxy the host reaches next.
    agent.onConnected((_proxy, address) => sessions.connected(address));
    return agent;
  });
  await Promise.all(agents.map((a) => a.start()));
  // Watchers start once the outboxes are open: what they notice is kept from the first poll on.
  const eventIds = timeOrderedIds(clock);
  const watchers = specs.length === 0 ? [] : agents.map((agent, i) => {
    const me = hostIdentities[i]!;
    const w = new Watchers({
      specs,
      clock,
      log: log.child({ host: me.id, component: "watchers" }),
      report: (watcher, kind, details) =>
        agent.reportEvent(create(HostEventSchema, { id: eventIds("e"), hostId: me.id, tenant: me.scope, kind, details, time: timestampFromMs(clock.now()), watcher })),
    });
    w.start();
    return w;
  });
  if (specs.length > 0) log.info("watchers", { watchers: specs.map((s) => `${s.kind}:${s.name}`) });
  metrics?.gauge("hosts_connected", "hosts of this process with a stream to a proxy now", () => agents.filter((a) => a.connected).length);
  metrics?.gauge("hosts", "hosts this process serves", () => agents.length);
  metrics?.gauge("sessions_open", "sessions and port forwards open on this process's hosts", () => sessionHosts.reduce((n, s) => n + s.count, 0));
  metrics?.gauge("store_used_bytes", "bytes in use in the daemon's LMDB store", () => env.usedBytes());
  const metricsServer = await metrics?.serveAt(config.metricsListen);
  const renewing = new AbortController();
  // Every host's renewal loop waits on this one signal (one listener each while it sleeps or calls): not a leak.
  setMaxListeners(allPaths.length + 10, renewing.signal);
  const renewals = allPaths.map((paths) =>
    keepRenewed({ paths, proxies: config.proxies!, renewBeforeMs: config.renewBefore, clock, log, signal: renewing.signal }).catch((err) => log.error("certificate renewal stopped", { err })),
  );
  return {
    agents,
    info: { role: "daemon", hosts: agents.map((a) => a.hostId), ...(metricsServer ? { metricsAddress: metricsServer.address } : {}) },
    async stop(graceMs) {
      for (const w of watchers) w.stop();
      renewing.abort();
      await metricsServer?.close();
      await Promise.all(renewals);
      for (const s of sessionHosts) s.stop();
      await Promise.all(agents.map((a) => a.stop(graceMs)));
      spawner?.stop();
      // Searches for leftovers still waiting for a shared scan (a session or a task that ended just now) run before the exit.
      markedScansOf(clock).flush();
      await env.close();
    },
  };
}

/** Enrollment before the agents start: a no-op while --identities holds a valid certificate for --host-id. */
async function enrollIfNeeded(config: DaemonConfig, log: Logger, clock: Clock): Promise<void> {
  if (!config.identities) throw new ConfigError("hostId needs identities: the directory enrollment writes the host's key and certificate to");
  if (!config.ca) throw new ConfigError("ca is required to enroll: the mesh CA certificate that enrollment servers are verified against");
  if (config.joinToken && (config.enrollCert || config.enrollKey)) throw new ConfigError("give one bootstrap credential: joinToken, or enrollCert and enrollKey");
  if (Boolean(config.enrollCert) !== Boolean(config.enrollKey)) throw new ConfigError("enrollCert and enrollKey go together");
  let credential: BootstrapCredential | undefined;
  if (config.joinToken) credential = { token: config.joinToken };
  else if (config.enrollCert && config.enrollKey) credential = { certPem: readConfigFile(config.enrollCert, "enrollCert"), keyPem: readConfigFile(config.enrollKey, "enrollKey") };
  await ensureEnrolled({
    dir: config.identities,
    hostId: config.hostId!,
    tenant: config.tenant,
    via: config.enrollVia ?? [],
    caPem: readConfigFile(config.ca, "ca"),
    credential,
    clock,
    log,
  });
}

/** A file a config option names; a ConfigError naming the option when it cannot be read. */
function readConfigFile(path: string, what: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (cause) {
    throw new ConfigError(`cannot read ${what} ${path}`, { cause });
  }
}
