import type { AddressInfo } from "node:net";
import { readCredentials } from "../certs/files.js";
import { systemClock, type Clock } from "../common/clock.js";
import type { Resolved, Schema } from "../common/config.js";
import { serveFrameLink } from "../common/connect-link.js";
import { callerOf, createRpcServer } from "../common/connect-server.js";
import { ConfigError } from "../common/errors.js";
import { timeOrderedIds } from "../common/ids.js";
import { parseHostPort, type Service } from "../common/lifecycle.js";
import type { Logger } from "../common/logger.js";
import { ControllerService } from "../gen/rexmesh/v1/controller_pb.js";
import { ProxyLinkService } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { controllerServiceImpl } from "./api.js";
import { BundleService } from "./bundles.js";
import { Inventory } from "./inventory.js";
import { LmdbEnv } from "../common/lmdb.js";
import { LmdbJobStore } from "./lmdb-job-store.js";
import { JobManager } from "./jobs.js";
import { serveProxyLink } from "./proxy-link.js";

export const controllerSchema = {
  listen: { type: "string", default: "127.0.0.1:7443", doc: "address for the public API and proxy links (host:port; port 0 picks one)" },
  cert: { type: "string", doc: "controller certificate (PEM)" },
  key: { type: "string", doc: "controller private key (PEM)" },
  ca: { type: "string", doc: "mesh CA certificate (PEM)" },
  data: { type: "string", default: "rexmesh-data/controller", doc: "directory of the controller's LMDB store (jobs, tasks, output, inventory)" },
  storeSize: { type: "int", default: 8 * 1024 ** 3, min: 1 << 20, doc: "bytes the store may hold; new jobs are refused (RESOURCE_EXHAUSTED) above 90% of it" },
  heartbeat: { type: "duration", default: "10s", doc: "heartbeat interval on proxy links" },
  deliveryDeadline: { type: "duration", default: "1h", doc: "delivery deadline of jobs that set none" },
  grace: { type: "duration", default: "10s", doc: "time allowed for a graceful stop" },
  readyFile: { type: "string", doc: "file written with the listening address once running" },
  logLevel: { type: "string", default: "info", doc: "debug, info, warn or error" },
} satisfies Schema;

export type ControllerConfig = Resolved<typeof controllerSchema>;

export function requireFiles(config: { cert?: string; key?: string; ca?: string }): { cert: string; key: string; ca: string } {
  for (const k of ["cert", "key", "ca"] as const) {
    if (!config[k]) throw new ConfigError(`${k} is required (--${k} FILE or REXMESH_${k.toUpperCase()})`);
  }
  return config as { cert: string; key: string; ca: string };
}

/** Wires the controller's parts together and starts serving. */
export async function startController(config: ControllerConfig, log: Logger, clock: Clock = systemClock): Promise<Service & { address: AddressInfo }> {
  const creds = readCredentials(requireFiles(config));
  const { host, port } = parseHostPort(config.listen, "listen");
  const env = new LmdbEnv({ path: config.data, maxBytes: config.storeSize });
  const store = new LmdbJobStore(env);
  const inventory = new Inventory(env.db("hosts"));
  const ids = timeOrderedIds(clock);
  const jobs = new JobManager({ store, inventory, clock, ids, log, defaultDeliveryDeadlineMs: config.deliveryDeadline });
  const bundles = new BundleService({ jobs, inventory, creds, clock, ids, log });
  jobs.recover();
  const linkDeps = { jobs, inventory, clock, log, heartbeatMs: config.heartbeat };
  const server = createRpcServer({
    creds,
    log,
    routes: (router) => {
      router.service(ControllerService, controllerServiceImpl({ jobs, inventory, bundles, callerOf, log }));
      router.service(ProxyLinkService, {
        proxyStream: (requests, ctx) => serveFrameLink(requests, ctx, (link, peer) => serveProxyLink(linkDeps, link, peer)),
      });
    },
  });
  const address = await server.listen(host, port);
  return {
    address,
    info: { role: "controller", address: `${address.address}:${address.port}` },
    async stop(graceMs) {
      await server.close(graceMs);
      jobs.close();
      await store.close();
    },
  };
}
