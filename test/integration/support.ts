import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Client } from "@connectrpc/connect";
import { operatorClient } from "../../cli/client.js";
import { REXMESH_BIN, type LocalMesh } from "../../cli/launcher.js";
import type { ControllerService, Job, Task } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputStream } from "../../gen/rexmesh/v1/task_pb.js";
import { promisify } from "node:util";

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `rexmesh-${prefix}-`));
}

export function clientOf(mesh: LocalMesh) {
  return operatorClient({}, mesh.exports());
}

export interface JobResult {
  job: Job;
  /** By host id. */
  tasks: Map<string, Task>;
  stdout: Map<string, Buffer>;
  stderr: Map<string, Buffer>;
  /** Output seqs seen per host, to check contiguity. */
  seqs: Map<string, number[]>;
}

/** Watches a job to the end and gathers every host's output, as a client would. */
export async function collectJob(client: Client<typeof ControllerService>, jobId: string, signal?: AbortSignal): Promise<JobResult> {
  const hostOf = new Map<string, string>();
  const result: JobResult = { job: undefined as unknown as Job, tasks: new Map(), stdout: new Map(), stderr: new Map(), seqs: new Map() };
  const parts = new Map<string, Buffer[]>();
  for await (const batch of client.watchJob({ jobId }, { signal })) {
    if (batch.job) result.job = batch.job;
    for (const t of batch.tasks) {
      hostOf.set(t.id, t.hostId);
      result.tasks.set(t.hostId, t);
    }
    for (const c of batch.output) {
      const host = c.hostId || hostOf.get(c.taskId)!;
      const key = `${host}\0${c.stream === OutputStream.STDERR ? "err" : "out"}`;
      let list = parts.get(key);
      if (!list) parts.set(key, (list = []));
      list.push(Buffer.from(c.data));
      let seqs = result.seqs.get(host);
      if (!seqs) result.seqs.set(host, (seqs = []));
      seqs.push(Number(c.seq));
    }
  }
  for (const [key, list] of parts) {
    const [host, stream] = key.split("\0") as [string, string];
    (stream === "err" ? result.stderr : result.stdout).set(host, Buffer.concat(list));
  }
  return result;
}

/** Alive means it exists and is not a zombie (this sandbox's init does not reap orphans). */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

export function hostIds(n: number, prefix = "h"): string[] {
  return Array.from({ length: n }, (_, i) => `${prefix}${String(i + 1).padStart(2, "0")}`);
}

const exec = promisify(execFile);

/** Runs the real CLI; resolves with its exit code and output whatever the code. */
export async function rexmesh(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const clean: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) clean[k] = v;
  try {
    const { stdout, stderr } = await exec(process.execPath, [REXMESH_BIN, ...args], { env: { ...clean, ...env }, maxBuffer: 64 << 20 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}


/**
 * A TCP relay that can stop forwarding without closing anything: the
 * connections stay open and go silent, as when a datacenter's link drops
 * packets. New connections made while cut hang until it is restored.
 */
export class SilentCut {
  private readonly server: import("node:net").Server;
  private readonly pairs = new Set<[import("node:net").Socket, import("node:net").Socket]>();
  private readonly waiting: import("node:net").Socket[] = [];
  private cut = false;
  address = "";

  private constructor(private readonly target: { host: string; port: number }, net: typeof import("node:net")) {
    this.server = net.createServer((client) => {
      client.pause();
      client.on("error", () => client.destroy());
      if (this.cut) this.waiting.push(client);
      else this.join(client, net);
    });
    this.net = net;
  }

  private readonly net: typeof import("node:net");

  static async start(target: string): Promise<SilentCut> {
    const net = await import("node:net");
    const [host, port] = target.split(":") as [string, string];
    const relay = new SilentCut({ host, port: Number(port) }, net);
    await new Promise<void>((resolve) => relay.server.listen(0, "127.0.0.1", resolve));
    relay.address = `127.0.0.1:${(relay.server.address() as import("node:net").AddressInfo).port}`;
    return relay;
  }

  private join(client: import("node:net").Socket, net: typeof import("node:net")): void {
    const upstream = net.connect(this.target.port, this.target.host);
    const pair: [import("node:net").Socket, import("node:net").Socket] = [client, upstream];
    this.pairs.add(pair);
    const end = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    upstream.on("error", end);
    client.on("error", end);
    client.on("close", end);
    upstream.on("close", end);
    client.on("data", (d) => upstream.write(d));
    upstream.on("data", (d) => client.write(d));
    if (!this.cut) {
      client.resume();
      upstream.resume();
    } else {
      upstream.pause();
    }
  }

  /** Stops forwarding in both directions; nothing is closed. */
  stop(): void {
    this.cut = true;
    for (const [a, b] of this.pairs) {
      a.pause();
      b.pause();
    }
  }

  /** Forwards again, including what was held and connections made meanwhile. */
  restore(): void {
    this.cut = false;
    for (const [a, b] of this.pairs) {
      a.resume();
      b.resume();
    }
    for (const c of this.waiting.splice(0)) this.join(c, this.net);
  }

  close(): void {
    for (const [a, b] of this.pairs) {
      a.destroy();
      b.destroy();
    }
    for (const c of this.waiting) c.destroy();
    this.server.close();
  }
}
