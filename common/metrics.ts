import http from "node:http";
import type { AddressInfo } from "node:net";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseHostPort } from "./lifecycle.js";

type Labels = Record<string, string>;

interface Family {
  help: string;
  type: "counter" | "gauge";
  /** Values read at scrape time (gauges of live state). */
  collect?: () => { labels?: Labels; value: number }[];
  values: Map<string, { labels: Labels; value: number }>;
}

function labelKey(labels: Labels): string {
  return Object.entries(labels)
    .sort(([a], [b]) => (a < b ? -1 : 1))
    .map(([k, v]) => `${k}="${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`)
    .join(",");
}

/**
 * A small Prometheus registry: counters incremented where things happen,
 * gauges read from live state at scrape time (so logic modules need no
 * hooks), and the text exposition format on its own HTTP port.
 */
export class Metrics {
  private readonly families = new Map<string, Family>();

  constructor(readonly prefix = "rexmesh_") {}

  private family(name: string, help: string, type: Family["type"]): Family {
    const full = this.prefix + name;
    let f = this.families.get(full);
    if (!f) this.families.set(full, (f = { help, type, values: new Map() }));
    return f;
  }

  /** A counter; returns the function that adds to it. */
  counter(name: string, help: string): (n?: number, labels?: Labels) => void {
    const f = this.family(name, help, "counter");
    return (n = 1, labels = {}) => {
      const key = labelKey(labels);
      const cur = f.values.get(key);
      if (cur) cur.value += n;
      else f.values.set(key, { labels, value: n });
    };
  }

  /** A gauge read at every scrape. */
  gauge(name: string, help: string, collect: () => number | { labels?: Labels; value: number }[]): void {
    const f = this.family(name, help, "gauge");
    f.collect = () => {
      const v = collect();
      return typeof v === "number" ? [{ value: v }] : v;
    };
  }

  /** The standard process gauges: event-loop delay and memory. */
  processGauges(): () => void {
    const delay = monitorEventLoopDelay({ resolution: 20 });
    delay.enable();
    this.gauge("event_loop_delay_p99_seconds", "99th percentile of event-loop delay since the last scrape", () => {
      const v = delay.percentile(99) / 1e9;
      delay.reset();
      return Number.isFinite(v) ? v : 0;
    });
    this.gauge("process_resident_memory_bytes", "resident set size", () => process.memoryUsage.rss());
    this.gauge("process_heap_used_bytes", "V8 heap in use", () => process.memoryUsage().heapUsed);
    return () => delay.disable();
  }

  render(): string {
    const out: string[] = [];
    for (const [name, f] of this.families) {
      out.push(`# HELP ${name} ${f.help}`, `# TYPE ${name} ${f.type}`);
      const values = f.collect ? f.collect().map((v) => ({ labels: v.labels ?? {}, value: v.value })) : [...f.values.values()];
      for (const v of values) {
        const l = labelKey(v.labels);
        out.push(`${name}${l ? `{${l}}` : ""} ${v.value}`);
      }
    }
    return out.join("\n") + "\n";
  }

  /** Serves GET /metrics at "host:port" when an address is configured; nothing otherwise. */
  async serveAt(listen: string | undefined): Promise<{ address: string; close: () => Promise<void> } | undefined> {
    if (!listen) return undefined;
    const { host, port } = parseHostPort(listen, "metricsListen");
    return this.serve(host, port);
  }

  /** Serves GET /metrics on its own port (plain HTTP: bind it to an internal address). */
  async serve(host: string, port: number): Promise<{ address: string; close: () => Promise<void> }> {
    const server = http.createServer((req, res) => {
      if (req.method === "GET" && req.url?.split("?")[0] === "/metrics") {
        res.writeHead(200, { "content-type": "text/plain; version=0.0.4" });
        res.end(this.render());
      } else {
        res.writeHead(404).end();
      }
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => resolve());
    });
    const a = server.address() as AddressInfo;
    return { address: `${a.address}:${a.port}`, close: () => new Promise((resolve) => server.close(() => resolve())) };
  }
}
