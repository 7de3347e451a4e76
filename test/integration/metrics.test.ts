import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { LocalMesh } from "../../cli/launcher.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

const scrape = async (address: unknown) => (await fetch(`http://${String(address)}/metrics`)).text();
const value = (text: string, series: string) => {
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
};

describe("Prometheus metrics", () => {
  const listen = ["--metrics-listen", "127.0.0.1:0"];
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("metrics"),
    regions: ["m"],
    hosts: [{ id: "m1", region: "m" }, { id: "m2", region: "m" }],
    hostsPerProcess: 2,
    controllerArgs: listen,
    proxyArgs: [...listen, "--heartbeat", "1s"],
    daemonArgs: [...listen, "--heartbeat", "1s"],
  });
  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(2);
  });
  afterAll(() => mesh.stop());

  it("shows a running job at the proxy and its results at the controller, with counts that match the job", async () => {
    const conn = clientOf(mesh);
    try {
      const script = "head -c 1000 /dev/zero; sleep 1";
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, steps: [{ tool: { case: "shell", value: { script } } }] }));
      // While it runs: both tasks are RUNNING at the proxy, both hosts connected.
      for (let i = 0; ; i++) {
        const p = await scrape(mesh.proxies[0]!.info!.metricsAddress);
        if (value(p, 'rexmesh_queued_tasks{state="RUNNING"}') === 2) {
          expect(value(p, "rexmesh_connected_hosts")).toBe(2);
          expect(value(p, "rexmesh_controller_link_up")).toBe(1);
          break;
        }
        if (i > 100) throw new Error("never saw the running tasks:\n" + p);
        await new Promise((r) => setTimeout(r, 50));
      }
      const d = await scrape(mesh.daemons[0]!.info!.metricsAddress);
      expect(value(d, "rexmesh_hosts_connected")).toBe(2);
      const r = await collectJob(conn.client, job!.id);
      expect([...r.tasks.values()].every((t) => t.state === TaskState.SUCCEEDED)).toBe(true);
      const c = await scrape(mesh.controller.info!.metricsAddress);
      expect(value(c, 'rexmesh_tasks_ended_total{region="m",state="SUCCEEDED"}')).toBe(2);
      expect(value(c, 'rexmesh_output_bytes_total{region="m"}')).toBe(2000);
      expect(value(c, 'rexmesh_hosts{connected="true",region="m"}')).toBe(2);
      expect(value(c, "rexmesh_store_used_bytes")).toBeGreaterThan(0);
      expect(c).toMatch(/^rexmesh_nodejs_eventloop_lag_p99_seconds \d/m);
      expect(value(c, "rexmesh_process_resident_memory_bytes")).toBeGreaterThan(0);
      // The job's times: both tasks ended SUCCEEDED after the sleep, each wrote output before it, and the job ended once.
      expect(value(c, 'rexmesh_task_duration_seconds_count{state="SUCCEEDED"}')).toBe(2);
      expect(value(c, 'rexmesh_task_duration_seconds_bucket{le="0.5",state="SUCCEEDED"}')).toBe(0);
      expect(value(c, "rexmesh_task_first_output_seconds_count")).toBe(2);
      expect(value(c, "rexmesh_task_first_output_seconds_sum")).toBeLessThan(value(c, 'rexmesh_task_duration_seconds_sum{state="SUCCEEDED"}')!);
      expect(value(c, "rexmesh_job_duration_seconds_count")).toBe(1);
      expect(value(c, "rexmesh_job_duration_seconds_sum")).toBeGreaterThanOrEqual(1);
      // Link round trips: the daemon pings its proxy once per link heartbeat (IDLE_FRAME_INTERVALS of its 1 s heartbeat; each
      // of its two hosts has its first about half of that after connecting), the proxy its controller once a heartbeat (1 s).
      for (let i = 0; ; i++) {
        const [dm, pm] = [await scrape(mesh.daemons[0]!.info!.metricsAddress), await scrape(mesh.proxies[0]!.info!.metricsAddress)];
        const daemonTrips = value(dm, 'rexmesh_link_round_trip_seconds_count{peer="proxy"}') ?? 0;
        const proxyTrips = value(pm, 'rexmesh_link_round_trip_seconds_count{peer="controller"}') ?? 0;
        if (daemonTrips >= 2 && proxyTrips >= 1) {
          // Every round trip on loopback is well under the 5 s bucket, and none counts twice.
          expect(value(dm, 'rexmesh_link_round_trip_seconds_bucket{le="5",peer="proxy"}')).toBe(daemonTrips);
          expect(value(pm, 'rexmesh_link_round_trip_seconds_bucket{le="5",peer="controller"}')).toBe(proxyTrips);
          break;
        }
        if (i > 100) throw new Error(`round trips never measured (daemon ${daemonTrips}, proxy ${proxyTrips})`);
        await new Promise((r) => setTimeout(r, 100));
      }
      // Each proxy reports its load; the controller shows it per proxy.
      for (let i = 0; value(await scrape(mesh.controller.info!.metricsAddress), 'rexmesh_proxy_connected_hosts{proxy="proxy-m",region="m"}') !== 2; i++) {
        if (i > 60) throw new Error("the proxy's load never reached the controller");
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      conn.close();
    }
  });
});
