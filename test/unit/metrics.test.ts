import { describe, expect, it } from "vitest";
import { Metrics } from "../../common/metrics.js";

describe("Metrics", () => {
  it("renders counters with labels and gauges read at scrape time, in the Prometheus text format", () => {
    const m = new Metrics();
    const sent = m.counter("output_bytes_total", "output bytes");
    sent(100, { region: "eu" });
    sent(20, { region: "eu" });
    sent(5, { region: 'u"s' });
    let live = 3;
    m.gauge("connected_hosts", "hosts connected now", () => live);
    live = 7;
    const text = m.render();
    expect(text).toContain("# TYPE rexmesh_output_bytes_total counter");
    expect(text).toContain('rexmesh_output_bytes_total{region="eu"} 120');
    expect(text).toContain('rexmesh_output_bytes_total{region="u\\"s"} 5');
    expect(text).toContain("rexmesh_connected_hosts 7");
  });

  it("serves /metrics over HTTP and 404s anything else", async () => {
    const m = new Metrics();
    m.gauge("up", "1 when running", () => 1);
    const srv = await m.serve("127.0.0.1", 0);
    try {
      const ok = await fetch(`http://${srv.address}/metrics`);
      expect(ok.status).toBe(200);
      expect(await ok.text()).toContain("rexmesh_up 1");
      expect((await fetch(`http://${srv.address}/other`)).status).toBe(404);
    } finally {
      await srv.close();
    }
  });
});
