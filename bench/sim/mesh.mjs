// A LocalMesh with no daemons (hosts: []) plus a Fleet of simulated hosts,
// with Prometheus metrics on the controller and every proxy; everything is
// stopped (and the simulator processes killed) whatever happens.
import { rmSync } from "node:fs";
import { join } from "node:path";
import { benchNodeArgs, cpuMs, LocalMesh, operatorClient, scratch } from "../lib/common.mjs";
import { profilingEnv } from "../lib/cpuprofile.mjs";
import { Fleet, scrapeSum, waitControllerHosts } from "./fleet.mjs";

const METRICS = ["--metrics-listen", "127.0.0.1:0"];

/** CPU time (user + system, ms) a process has used, from /proc (0 when it is gone). */
export const cpuMsOf = cpuMs;

/**
 * plan: { regions, extraProxies?: [{ region, name }], proxyArgs?, controllerArgs?, fleet: { hosts, perProcess, proxiesFor(k, mesh), ... }, profileDir? }
 * fn(ctx) with ctx = { mesh, client, fleet, controllerMetrics, proxyMetrics(p), toggleProfile() }.
 * With profileDir, the controller and the proxies are started with the CPU
 * profiler armed (bench/lib/cpuprofile.mjs, window mode): ctx.toggleProfile()
 * starts it and, called again, writes their profiles there.
 */
export async function withSimMesh(plan, fn) {
  const saved = process.env.NODE_OPTIONS;
  // LocalMesh hands its processes this process's environment when it spawns them.
  if (plan.profileDir) Object.assign(process.env, profilingEnv(plan.profileDir, { cpu: true, window: true }));
  const mesh = new LocalMesh({
    dir: scratch("sim"),
    regions: plan.regions,
    hosts: [],
    logLevel: "warn",
    nodeArgs: benchNodeArgs(),
    controllerArgs: [...METRICS, ...(plan.controllerArgs ?? [])],
    proxyArgs: [...METRICS, ...(plan.proxyArgs ?? [])],
  });
  let fleet;
  let conn;
  try {
    await mesh.start();
    for (const x of plan.extraProxies ?? []) await mesh.startExtraProxy(x.region, x.name);
    if (plan.profileDir) {
      if (saved === undefined) delete process.env.NODE_OPTIONS;
      else process.env.NODE_OPTIONS = saved;
    }
    const f = plan.fleet;
    fleet = new Fleet({ ...f, caDir: join(mesh.dir, "ca"), proxiesFor: (k) => f.proxiesFor(k, mesh) });
    conn = operatorClient({}, mesh.exports());
    const ctx = {
      mesh,
      client: conn.client,
      fleet,
      controllerMetrics: String(mesh.controller.info.metricsAddress),
      proxyMetrics: (p) => String(p.info.metricsAddress),
      /** Hosts a proxy holds now, from its metrics. */
      proxyHosts: (p) => scrapeSum(String(p.info.metricsAddress), "rexmesh_connected_hosts"),
      waitController: (n, timeoutMs) => waitControllerHosts(String(mesh.controller.info.metricsAddress), n, timeoutMs),
      toggleProfile: () => {
        if (!plan.profileDir) return;
        for (const p of [mesh.controller, ...mesh.proxies]) {
          try {
            process.kill(p.proc.pid, "SIGUSR2");
          } catch {
            /* exited */
          }
        }
      },
    };
    return await fn(ctx);
  } finally {
    conn?.close();
    await fleet?.stop().catch(() => {});
    await mesh.stop();
    if (!process.env.BENCH_KEEP) rmSync(mesh.dir, { recursive: true, force: true });
  }
}
