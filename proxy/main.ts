import { readCredentials } from "../certs/files.js";
import { identityFromCertificate, requireRole } from "../certs/identity.js";
import { systemClock, type Clock } from "../common/clock.js";
import { requireFiles, type Resolved, type Schema } from "../common/config.js";
import { clientFor, openChannel } from "../common/connect-dial.js";
import { openFrameLink } from "../common/connect-link.js";
import { createGrpcLinkServer, type LinkHandler, type UnaryHandler } from "../common/grpc-link.js";
import { create } from "@bufbuild/protobuf";
import { openBundle, sealBundle } from "../common/bundle.js";
import { DenySet, openDenyList } from "../common/deny-list.js";
import { guardLink, guardUnary } from "../common/rpc-access.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { PROXY_ENROLL_LISTENER_DECLARATIONS, proxyDeclarations } from "./declarations.js";
import { addHealthToGrpc, HealthState } from "../common/health.js";
import { Metrics, ROUND_TRIP_BUCKETS } from "../common/metrics.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { PeerIdentity } from "../certs/identity.js";
import { BundleKind } from "../gen/rexmesh/v1/bundle_pb.js";
import { ExportResultsResponseSchema, ImportArtifactChunkResponseSchema, ImportTasksResponseSchema, ProxyAdminService, type ImportArtifactChunkRequest, type ImportTasksRequest } from "../gen/rexmesh/v1/proxy_admin_pb.js";
import { ConfigError } from "../common/errors.js";
import { parseHostPort, type Service } from "../common/lifecycle.js";
import type { Logger } from "../common/logger.js";
import { AgentLinkService } from "../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyLinkService, type ProxySessionRequest, type ProxySessionResponse, type ProxyStreamRequest, type ProxyStreamResponse } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { SessionRelays, type HostSessionLink } from "./session-relay.js";
import { ProxyCore, type ControllerLink } from "./proxy.js";
import { reconnectLoop } from "../common/reconnect.js";
import { LmdbEnv } from "../common/lmdb.js";
import { LmdbProxyStore } from "./lmdb-store.js";
import { createOpenUnaryServer } from "../common/open-unary-server.js";
import { EnrollService, type EnrollRequest } from "../gen/rexmesh/v1/enroll_pb.js";
import { join } from "node:path";
import { ArtifactCacheService, ArtifactService, GetArtifactChunkResponseSchema, type GetArtifactChunkRequest } from "../gen/rexmesh/v1/artifact_pb.js";
import { ArtifactCache } from "./artifact-cache.js";

export const proxySchema = {
  listen: { type: "string", default: "127.0.0.1:7444", doc: "address daemons connect to (host:port; port 0 picks one)" },
  controller: { type: "string", doc: "controller address (host:port)" },
  cert: { type: "string", doc: "proxy certificate (PEM); its identity names the proxy and its region" },
  key: { type: "string", doc: "proxy private key (PEM)" },
  ca: { type: "string", doc: "mesh CA certificate (PEM)" },
  data: { type: "string", default: "rexmesh-data/proxy", doc: "directory of the proxy's LMDB store (queued tasks, results not yet delivered)" },
  storeSize: { type: "int", default: 8 * 1024 ** 3, min: 1 << 20, doc: "bytes the store may hold; new tasks are refused above 90% of it" },
  heartbeat: { type: "duration", default: "10s", doc: "heartbeat interval on both links" },
  metricsListen: { type: "string", doc: "address for Prometheus metrics over plain HTTP (GET /metrics); off when unset" },
  grace: { type: "duration", default: "10s", doc: "time allowed for a graceful stop: streams stay open for the tasks running on them and their results (new hosts are refused, no task is handed out)" },
  relayTimeout: { type: "duration", default: "30s", doc: "time a relayed enrollment or certificate renewal may take at the controller" },
  artifactFetchTimeout: { type: "duration", default: "10m", doc: "time one artifact may take to come from the controller into the proxy's cache" },
  reconnectMin: { type: "duration", default: "500ms", doc: "first wait before dialling the controller again after a failure; it grows 1.6 times per failed attempt, up to --reconnect-max" },
  reconnectMax: { type: "duration", default: "30s", doc: "longest wait between attempts to reach the controller" },
  enrollListen: { type: "string", doc: "address serving only EnrollService without asking for a client certificate; requests are relayed to the controller (host:port; port 0 picks one); off by default" },
  readyFile: { type: "string", doc: "file written with the listening address once running" },
  logLevel: { type: "string", default: "info", doc: "debug, info, warn or error" },
} satisfies Schema;

export type ProxyConfig = Resolved<typeof proxySchema>;

/** Wires the proxy: serves daemons, and keeps dialling the controller. */
export async function startProxy(config: ProxyConfig, log: Logger, clock: Clock = systemClock): Promise<Service & { address: { address: string; port: number }; core: ProxyCore }> {
  if (!config.controller) throw new ConfigError("controller is required (--controller HOST:PORT or REXMESH_CONTROLLER)");
  const controllerAddress = config.controller;
  if (config.reconnectMin > config.reconnectMax) throw new ConfigError(`reconnectMin (${config.reconnectMin} ms) is longer than reconnectMax (${config.reconnectMax} ms)`);
  const creds = readCredentials(requireFiles(config));
  const me = requireRole(identityFromCertificate(creds.certPem), "proxy");
  const { host, port } = parseHostPort(config.listen, "listen");
  log = log.child({ proxy: me.id, region: me.scope });
  const env = new LmdbEnv({ path: config.data, maxBytes: config.storeSize });
  const denied = new DenySet();
  const metrics = new Metrics();
  const roundTrip = metrics.histogram("link_round_trip_seconds", "round trip of a ping on this process's links, by the peer at the other end", ROUND_TRIP_BUCKETS, ["peer"]);
  const hostsGone = metrics.counter("host_disconnects_total", "host streams ended here, by reason (silent, heartbeat, ended, error), and second streams of a held host refused (duplicate)", ["reason"]);
  // Sessions: orders come on the controller link; each session's leg to the controller shares one connection.
  let sessionChannel: ReturnType<typeof openChannel> | undefined;
  const sessionClient = () => clientFor(ProxyLinkService, (sessionChannel ??= openChannel(controllerAddress, creds, ["controller"])));
  const sessionBytes = metrics.counter("session_bytes_total", "sealed bytes of sessions and port forwards relayed, by direction", ["direction"]);
  const sessions: SessionRelays = new SessionRelays({
    clock,
    log,
    name: me.id,
    meter: (direction, bytes) => sessionBytes.inc({ direction }, bytes),
    offerToHost: (hostId, order) => core.offerSession(hostId, order),
    dialController: () => {
      const client = sessionClient();
      return openFrameLink<ProxySessionRequest, ProxySessionResponse>((out, signal) => client.proxySession(out, { signal }), () => undefined);
    },
  });
  const core = new ProxyCore({
    name: me.id,
    region: me.scope,
    clock,
    store: new LmdbProxyStore(env),
    log,
    heartbeatMs: config.heartbeat,
    controllerRoundTrip: (s) => roundTrip.observe({ peer: "controller" }, s),
    onSessionOrder: (order) => sessions.order(order),
    onHostGone: (reason) => hostsGone.inc({ reason }),
    // The boundary below asks the same deny-list as the core: every list the core takes is mirrored here.
    openDenyList: (signed) => {
      const list = openDenyList(signed, creds.caPem, clock);
      denied.update(list);
      return list;
    },
  });
  core.start();
  // Daemons: grpc-js, for its lower memory per idle stream (docs/transport.md).
  // Every method passes the boundary of proxy/declarations.ts first.
  const declarations = proxyDeclarations(me);
  const boundary = { isRevoked: (peer: PeerIdentity) => denied.has(peer), log };
  // Renewal: a host renews its own certificate over its authenticated link; relayed like enrollment.
  let renewChannel: ReturnType<typeof openChannel> | undefined;
  const renewClient = () => clientFor(EnrollService, (renewChannel ??= openChannel(controllerAddress, creds, ["controller"])));
  // Artifacts: served to hosts from a disk cache, fetched from the controller once per digest.
  let artifactChannel: ReturnType<typeof openChannel> | undefined;
  const artifacts = new ArtifactCache({
    dir: join(config.data, "artifacts"),
    log,
    fetch: async function* (digest) {
      const client = clientFor(ArtifactService, (artifactChannel ??= openChannel(controllerAddress, creds, ["controller"])));
      for await (const r of client.getArtifact({ digest }, { timeoutMs: config.artifactFetchTimeout })) yield r.data;
    },
  });
  const admin: UnaryHandler[] = [
    {
      method: ArtifactCacheService.method.getArtifactChunk,
      handle: async (req: GetArtifactChunkRequest) => {
        const r = await artifacts.chunk(req.digest, Number(req.offset));
        return create(GetArtifactChunkResponseSchema, { size: BigInt(r.size), data: r.data });
      },
    },
    {
      method: EnrollService.method.enroll,
      handle: async (req: EnrollRequest) => {
        log.debug("relaying renewal", { host: req.hostId });
        return renewClient().enroll(req, { timeoutMs: config.relayTimeout });
      },
    },
    {
      method: ProxyAdminService.method.importTasks,
      handle: async (req: ImportTasksRequest) => {
        const { payload } = openBundle(req.bundle, { caPem: creds.caPem, signerRole: "controller", kind: BundleKind.TASKS, clock });
        const r = await core.importTasks(payload);
        log.info("tasks bundle imported", { bundle: payload.id, ...r });
        return create(ImportTasksResponseSchema, { tasksAdded: r.added, tasksAlreadyKnown: r.known });
      },
    },
    {
      method: ProxyAdminService.method.importArtifactChunk,
      handle: async (req: ImportArtifactChunkRequest) => {
        const r = await artifacts.importChunk(req.digest, Number(req.size), Number(req.offset), req.data);
        return create(ImportArtifactChunkResponseSchema, { received: BigInt(r.received), complete: r.complete });
      },
    },
    {
      method: ProxyAdminService.method.exportResults,
      handle: async () => {
        const r = core.resultsForBundle();
        const bundle = sealBundle({ kind: BundleKind.RESULTS, region: me.scope, proxy: me.id, ...r }, creds, clock, `r${clock.now().toString(36)}`);
        return create(ExportResultsResponseSchema, { bundle, statuses: r.statuses.length, outputChunks: r.output.length });
      },
    },
  ].map((h) => guardUnary(declarations, h, boundary));
  declarations.requireDeclared([AgentLinkService.method.agentStream, AgentLinkService.method.agentSession, ...admin.map((h) => h.method), ...Health.methods]);
  const health = new HealthState([AgentLinkService.typeName]);
  const server = createGrpcLinkServer({
    creds,
    log,
    method: AgentLinkService.method.agentStream,
    serve: guardLink(declarations, AgentLinkService.method.agentStream, (link: Parameters<ProxyCore["serveHost"]>[0], peer) => core.serveHost(link, peer), boundary),
    links: [
      {
        method: AgentLinkService.method.agentSession,
        serve: guardLink(declarations, AgentLinkService.method.agentSession, (link: HostSessionLink, peer) => sessions.serveHost(link, peer), boundary),
      } as unknown as LinkHandler,
    ],
    unary: admin,
    extend: (s) => addHealthToGrpc(s, health),
  });
  const address = { address: host, port: await server.listen(host, port) };

  // Enrollment relay: daemons without a certificate yet reach the
  // controller's EnrollService through this proxy, which calls it with its
  // own certificate; the controller decides, and records the relay.
  let enrollServer: ReturnType<typeof createOpenUnaryServer> | undefined;
  let enrollChannel: ReturnType<typeof openChannel> | undefined;
  let enrollAddress: string | undefined;
  if (config.enrollListen) {
    const e = parseHostPort(config.enrollListen, "enrollListen");
    PROXY_ENROLL_LISTENER_DECLARATIONS.requireDeclared([EnrollService.method.enroll]);
    const channel = (enrollChannel = openChannel(controllerAddress, creds, ["controller"]));
    const enrollClient = clientFor(EnrollService, channel);
    enrollServer = createOpenUnaryServer({
      creds,
      log,
      handlers: [
        {
          method: EnrollService.method.enroll,
          handle: async (req: EnrollRequest) => {
            log.debug("relaying enrollment", { host: req.hostId });
            return enrollClient.enroll(req, { timeoutMs: config.relayTimeout });
          },
        },
      ],
    });
    enrollAddress = `${e.host}:${await enrollServer.listen(e.host, e.port)}`;
  }

  const store = core.store;
  metrics.gauge("connected_hosts", "host streams held now", () => core.connectedHosts);
  metrics.gauge("sessions_relayed", "sessions and port forwards relayed now", () => sessions.relaying);
  metrics.gauge("controller_link_up", "1 while the link to the controller is up", () => (core.controllerConnected ? 1 : 0));
  metrics.gauge("queued_tasks", "tasks held for this region's hosts, by state", () => {
    const n = new Map<string, number>();
    for (const t of store.allTasks()) n.set(TaskState[t.state] ?? String(t.state), (n.get(TaskState[t.state] ?? String(t.state)) ?? 0) + 1);
    return [...n].map(([state, value]) => ({ labels: { state }, value }));
  }, ["state"]);
  metrics.gauge("result_backlog_items", "statuses, output chunks and hosts' events not yet acknowledged by the controller", () => store.upwardSize());
  metrics.gauge("store_used_bytes", "bytes in use in the proxy's LMDB store", () => env.usedBytes());
  const reconnects = metrics.counter("controller_link_attempts_total", "attempts to open the link to the controller");
  const metricsServer = await metrics.serveAt(config.metricsListen);
  const stop = new AbortController();
  const uplink = reconnectLoop<ControllerLink>({
    targets: [controllerAddress],
    what: "controller link",
    clock,
    log,
    signal: stop.signal,
    backoff: { initialMs: config.reconnectMin, maxMs: config.reconnectMax },
    onAttempt: () => reconnects.inc(),
    dial: async () => {
      const channel = openChannel(controllerAddress, creds, ["controller"]);
      const client = clientFor(ProxyLinkService, channel);
      // Frames up are written by hand (common/proxy-link-wire.ts), output in the wire form its backlog stored it in:
      // encoded once at this hop (common/output-wire.ts).
      return openFrameLink<ProxyStreamRequest, ProxyStreamResponse>((out, signal) => client.proxyStream(out, { signal }), (err) => channel.close(err));
    },
    serve: (link, _target, up) => core.serveController(link, () => up()),
    close: (link) => link.close(),
  });

  return {
    address,
    core,
    info: { role: "proxy", name: me.id, region: me.scope, address: `${address.address}:${address.port}`, ...(enrollAddress ? { enrollAddress } : {}), ...(metricsServer ? { metricsAddress: metricsServer.address } : {}) },
    draining: () => health.draining(),
    async stop(graceMs) {
      // The link to the controller stays up while the core drains: the results of what ends meanwhile go up now.
      // One grace for the whole stop: what the drain used is not given again to the servers.
      const until = clock.now() + graceMs;
      await core.drain(graceMs);
      stop.abort();
      await metricsServer?.close();
      core.stop();
      sessions.stop();
      const left = Math.max(0, until - clock.now());
      await Promise.all([server.close(left), enrollServer?.close(left), uplink]);
      enrollChannel?.close();
      renewChannel?.close();
      artifactChannel?.close();
      sessionChannel?.close();
      await env.close();
    },
  };
}
