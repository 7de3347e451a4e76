import { readdirSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { Metrics } from "../../common/metrics.js";

describe("Metrics", () => {
  it("renders counters with labels and gauges read at scrape time, in the Prometheus text format", async () => {
    const m = new Metrics();
    const sent = m.counter("output_bytes_total", "output bytes", ["region"]);
    sent.inc({ region: "eu" }, 100);
    sent.inc({ region: "eu" }, 20);
    sent.inc({ region: 'u"s' }, 5);
    let live = 3;
    m.gauge("connected_hosts", "hosts connected now", () => live);
    let states = [{ labels: { state: "RUNNING" }, value: 2 }];
    m.gauge("queued_tasks", "tasks by state", () => states, ["state"]);
    live = 7;
    expect(await m.render()).toContain("rexmesh_connected_hosts 7");
    // A label set that is gone from live state is gone from the next scrape.
    states = [{ labels: { state: "QUEUED" }, value: 1 }];
    const text = await m.render();
    expect(text).toContain("# TYPE rexmesh_output_bytes_total counter");
    expect(text).toContain('rexmesh_output_bytes_total{region="eu"} 120');
    expect(text).toContain('rexmesh_output_bytes_total{region="u\\"s"} 5');
    expect(text).toContain('rexmesh_queued_tasks{state="QUEUED"} 1');
    expect(text).not.toContain('state="RUNNING"');
  });

  it("keeps each instance's series apart, and adds the process's default metrics to every scrape", async () => {
    const a = new Metrics();
    const b = new Metrics();
    a.histogram("job_duration_seconds", "job time", [1, 10]).observe(3);
    b.histogram("job_duration_seconds", "job time", [1, 10]);
    const ta = await a.render();
    const tb = await b.render();
    expect(ta).toContain('rexmesh_job_duration_seconds_bucket{le="10"} 1');
    expect(ta).toContain("rexmesh_job_duration_seconds_count 1");
    expect(tb).toContain("rexmesh_job_duration_seconds_count 0");
    for (const t of [ta, tb]) {
      expect(t).toMatch(/^rexmesh_process_resident_memory_bytes \d+/m);
      expect(t).toMatch(/^rexmesh_nodejs_heap_size_used_bytes \d+/m);
      expect(t).toMatch(/^rexmesh_nodejs_eventloop_lag_p99_seconds \d/m);
      expect(t).toMatch(/^rexmesh_process_cpu_seconds_total \d/m);
    }
  });

  it("counts the process's descriptors and resources, and lists no handle objects (a scrape of a proxy of 50,000 hosts must not walk them all on the event loop)", async () => {
    const open = readdirSync("/proc/self/fd").length - 1;
    const t = await new Metrics().render();
    const fds = Number(/^rexmesh_process_open_fds (\d+)/m.exec(t)?.[1]);
    expect(Math.abs(fds - open)).toBeLessThanOrEqual(3);
    expect(t).toMatch(/^rexmesh_nodejs_active_resources_total \d+/m);
    expect(t).not.toMatch(/rexmesh_nodejs_active_handles/);
    expect(t.match(/^# TYPE rexmesh_process_open_fds /gm)).toHaveLength(1);
  });

  it("serves /metrics over HTTP and 404s anything else", async () => {
    const m = new Metrics();
    m.gauge("up", "1 when running", () => 1);
    const srv = await m.serve("127.0.0.1", 0);
    try {
      const ok = await fetch(`http://${srv.address}/metrics`);
      expect(ok.status).toBe(200);
      expect(ok.headers.get("content-type")).toMatch(/^text\/plain; version=0\.0\.4/);
      expect(await ok.text()).toContain("rexmesh_up 1");
      expect((await fetch(`http://${srv.address}/other`)).status).toBe(404);
    } finally {
      await srv.close();
    }
  });
});
