import { readdir } from "node:fs/promises";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import { parseHostPort } from "./lifecycle.js";

type Labels = Record<string, string>;

/** Every rexmesh series starts with this, the process metrics too. */
const METRIC_PREFIX = "rexmesh_";

/** Buckets for durations from milliseconds to an hour (jobs, tasks). */
export const DURATION_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600];
/** Buckets for round trips on a link, from a millisecond to seconds. */
export const ROUND_TRIP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

/** Labels in name order, as the exposition writes them in the order given (and scrapers' tests read it). */
function sorted(labels: Labels): Labels {
  return Object.fromEntries(Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : 1)));
}

let processRegistry: Registry | undefined;

/**
 * prom-client's default metrics (CPU, memory, heap, event-loop lag, GC,
 * handles), registered once per process: they describe the process, not a
 * role, and a process may hold several roles (tests, `rexmesh dev`), each
 * with its own registry. Their collectors run for the life of the process.
 */
function processMetrics(): Registry {
  if (!processRegistry) {
    const registry = (processRegistry = new Registry());
    collectDefaultMetrics({ register: registry, prefix: METRIC_PREFIX });
    // Three of them list every socket at each scrape, on the event loop: 23 ms per scrape of a
    // process holding 5,000 connections (both ends of each), 10 times that for a proxy of 50,000
    // hosts. active_handles makes a JavaScript object of each handle and says what
    // active_resources says; it goes. The descriptors are counted off the event loop.
    for (const name of ["nodejs_active_handles", "nodejs_active_handles_total", "process_open_fds"]) registry.removeSingleMetric(METRIC_PREFIX + name);
    new Gauge({
      name: `${METRIC_PREFIX}process_open_fds`,
      help: "Number of open file descriptors.",
      registers: [registry],
      async collect() {
        try {
          // The directory's own descriptor, open while it is read, is not counted.
          this.set((await readdir("/proc/self/fd")).length - 1);
        } catch {
          // No /proc (not Linux): no count.
        }
      },
    });
  }
  return processRegistry;
}

/**
 * One role instance's Prometheus metrics, on prom-client: counters and
 * histograms updated where things happen, gauges read from live state at
 * scrape time (so logic modules need no hooks). A registry of its own, never
 * prom-client's global one, so that two roles in one process (tests, a
 * daemon's hosts beside a proxy) never share or clash over a series; the
 * scrape adds the process-wide default metrics.
 */
export class Metrics {
  readonly registry = new Registry();

  constructor(readonly prefix = METRIC_PREFIX) {}

  /** A counter; `labelNames` are all the labels it will be given. */
  counter<L extends string = never>(name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
    return new Counter<L>({ name: this.prefix + name, help, labelNames, registers: [this.registry] });
  }

  /** A histogram in seconds. */
  histogram<L extends string = never>(name: string, help: string, buckets: readonly number[], labelNames: readonly L[] = []): Histogram<L> {
    return new Histogram<L>({ name: this.prefix + name, help, labelNames, buckets: [...buckets], registers: [this.registry] });
  }

  /** A gauge read at every scrape: one number, or one value per label set (`labelNames` names them all). */
  gauge(name: string, help: string, collect: () => number | { labels: Labels; value: number }[], labelNames: readonly string[] = []): void {
    new Gauge({
      name: this.prefix + name,
      help,
      labelNames,
      registers: [this.registry],
      collect() {
        const v = collect();
        this.reset();
        if (typeof v === "number") this.set(v);
        else for (const s of v) this.set(sorted(s.labels), s.value);
      },
    });
  }

  /** The text exposition: this role's series, then the process's. */
  async render(): Promise<string> {
    const own = await this.registry.metrics();
    return `${own}${own.endsWith("\n") || own === "" ? "" : "\n"}${await processMetrics().metrics()}`;
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
        this.render().then(
          (text) => res.writeHead(200, { "content-type": this.registry.contentType }).end(text),
          () => res.writeHead(500).end(),
        );
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
