import { readdirSync } from "node:fs";
import { join } from "node:path";
import { readCredentials, type CredentialPaths, type Credentials } from "../certs/files.js";
import { identityFromCertificate, requireRole } from "../certs/identity.js";
import { systemClock, type Clock } from "../common/clock.js";
import type { Resolved, Schema } from "../common/config.js";
import { openGrpcLink } from "../common/grpc-link.js";
import { ConfigError } from "../common/errors.js";
import type { Service } from "../common/lifecycle.js";
import type { Logger } from "../common/logger.js";
import { AgentLinkService } from "../gen/rexmesh/v1/agent_link_pb.js";
import { Agent, type Dialer } from "./agent.js";
import { Executor } from "./executor.js";
import { collectFacts } from "./facts.js";
import { LmdbEnv } from "../common/lmdb.js";
import { LmdbBacklog } from "../common/lmdb-backlog.js";
import { LmdbLedger } from "./lmdb-ledger.js";

export const daemonSchema = {
  proxies: { type: "list", doc: "proxies of this host's region (host:port, comma separated); the next one is tried when one fails" },
  cert: { type: "string", doc: "host certificate (PEM)" },
  key: { type: "string", doc: "host private key (PEM)" },
  ca: { type: "string", doc: "mesh CA certificate (PEM)" },
  identities: { type: "string", doc: "directory of <host>.crt/<host>.key pairs plus ca.crt: one process serves each as a separate host (for dev meshes and labs)" },
  data: { type: "string", default: "rexmesh-data/daemon", doc: "directory of the daemon's LMDB store (ledger of accepted tasks, output not yet delivered)" },
  storeSize: { type: "int", default: 2 * 1024 ** 3, min: 1 << 20, doc: "bytes the store may hold" },
  capacity: { type: "int", default: 4, min: 1, doc: "tasks run at once per host" },
  heartbeat: { type: "duration", default: "10s", doc: "heartbeat interval" },
  outputLimit: { type: "int", default: 64 * 1024 * 1024, min: 0, doc: "output bytes kept per task when the job sets no limit" },
  maxUnackedOutput: { type: "int", default: 16 * 1024 * 1024, min: 65536, doc: "output bytes per host not yet acknowledged by the proxy; above it, tasks block in write() until acks arrive" },
  killGrace: { type: "duration", default: "2s", doc: "time between SIGTERM and SIGKILL when a task is stopped" },
  grace: { type: "duration", default: "10s", doc: "time allowed for a graceful stop" },
  readyFile: { type: "string", doc: "file written once the daemon runs" },
  logLevel: { type: "string", default: "info", doc: "debug, info, warn or error" },
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

/** Dials a proxy's AgentLink over grpc-js (see docs/transport.md for why grpc-js here). */
export function grpcDialer(creds: Credentials): Dialer {
  return async (address) => openGrpcLink(address, creds, ["proxy"], AgentLinkService.method.agentStream);
}

/** Starts one agent per host identity this process serves. */
export async function startDaemon(config: DaemonConfig, log: Logger, clock: Clock = systemClock): Promise<Service & { agents: Agent[] }> {
  if (!config.proxies || config.proxies.length === 0) throw new ConfigError("proxies is required (--proxies HOST:PORT[,HOST:PORT...])");
  const executor = new Executor({ clock, defaultOutputLimit: config.outputLimit, killGraceMs: config.killGrace });
  const facts = collectFacts();
  const env = new LmdbEnv({ path: config.data, maxBytes: config.storeSize });
  const ledgers = env.db<never>("ledger") as never;
  const outboxes = env.db<Buffer>("outbox", "binary") as never;
  const agents = identityPaths(config).map((paths) => {
    const creds = readCredentials(paths);
    const me = requireRole(identityFromCertificate(creds.certPem), "host");
    return new Agent({
      hostId: me.id,
      tenant: me.scope,
      proxies: config.proxies!,
      dial: grpcDialer(creds),
      executor,
      ledger: new LmdbLedger(ledgers, me.id),
      outbox: new LmdbBacklog(outboxes, me.id),
      facts,
      clock,
      log: log.child({ host: me.id }),
      capacity: config.capacity,
      heartbeatMs: config.heartbeat,
      maxUnackedOutputBytes: config.maxUnackedOutput,
    });
  });
  await Promise.all(agents.map((a) => a.start()));
  return {
    agents,
    info: { role: "daemon", hosts: agents.map((a) => a.hostId) },
    async stop(graceMs) {
      await Promise.all(agents.map((a) => a.stop(graceMs)));
      await env.close();
    },
  };
}
