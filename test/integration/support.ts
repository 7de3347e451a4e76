import { spawn } from "node:child_process";
import { constants as osConstants } from "node:os";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Client } from "@connectrpc/connect";
import { afterAll, beforeAll } from "vitest";
import { operatorClient } from "../../cli/client.js";
import { LocalMesh, REXMESH_BIN, type RoleProcess } from "../../cli/launcher.js";
import type { ControllerService, Job, Task } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputStream } from "../../gen/rexmesh/v1/task_pb.js";
import { testCa } from "../test-ca.js";

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
  /** Every chunk per host, in the order read. */
  chunks: Map<string, { seq: number; data: Buffer }[]>;
}

/** Watches a job to the end and gathers every host's output, as a client would. */
export async function collectJob(client: Client<typeof ControllerService>, jobId: string, signal?: AbortSignal): Promise<JobResult> {
  const hostOf = new Map<string, string>();
  const result: JobResult = { job: undefined as unknown as Job, tasks: new Map(), stdout: new Map(), stderr: new Map(), seqs: new Map(), chunks: new Map() };
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
      let chunks = result.chunks.get(host);
      if (!chunks) result.chunks.set(host, (chunks = []));
      chunks.push({ seq: Number(c.seq), data: Buffer.from(c.data) });
    }
  }
  for (const [key, list] of parts) {
    const [host, stream] = key.split("\0") as [string, string];
    (stream === "err" ? result.stderr : result.stdout).set(host, Buffer.concat(list));
  }
  return result;
}

/** Polls `probe` (backing off to 200 ms) until it answers something, or fails naming `what` after `timeoutMs`. */
export async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 20; ; delay = Math.min(delay * 2, 200)) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, delay));
  }
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

/**
 * A mesh of one region for a suite's fault tests: its hosts (`hostsPerProcess`
 * to a daemon process) and every role on 1 s heartbeats, started with every
 * host connected before the suite's tests and stopped after them; `marks` is
 * the folder where workloads record each start of a command ({@link spawnsOf}).
 */
export function faultMesh(name: string, region: string, hosts: readonly string[], hostsPerProcess: number): { mesh: LocalMesh; marks: string } {
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir(name),
    regions: [region],
    hosts: hosts.map((id) => ({ id, region })),
    hostsPerProcess,
    shareHostKey: true,
    daemonArgs: ["--heartbeat", "1s"],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  const marks = join(mesh.dir, "marks");
  beforeAll(async () => {
    await mesh.start();
    mkdirSync(marks, { recursive: true });
    await mesh.waitForHosts(hosts.length);
  }, 180_000);
  afterAll(() => mesh.stop());
  return { mesh, marks };
}

/** Sends a role process a signal (SIGKILL by default) and waits until it has exited. */
export async function killRole(mesh: LocalMesh, p: RoleProcess, signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
  p.proc.kill(signal);
  await mesh.exited(p);
}

/** How many times a task's command started, from the marker file its script appends its task id to. */
export function spawnsOf(marks: string, taskId: string): number {
  const f = join(marks, taskId);
  return existsSync(f) ? readFileSync(f, "utf8").trim().split("\n").length : 0;
}

export function hostIds(n: number, prefix = "h"): string[] {
  return Array.from({ length: n }, (_, i) => `${prefix}${String(i + 1).padStart(2, "0")}`);
}

/** The environment of a CLI run: this process's without its REXMESH_* settings, then `env`. */
export function cliEnv(env: Record<string, string>): NodeJS.ProcessEnv {
  const clean: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) clean[k] = v;
  return { ...clean, ...env };
}

/** Runs the real CLI with `input` on its stdin (a pipe, ended after it); resolves with its exit code and output whatever the code. */
export function rexmesh(args: string[], env: Record<string, string> = {}, input = ""): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [REXMESH_BIN, ...args], { env: cliEnv(env), stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code: code ?? 128 + (signal ? osConstants.signals[signal] : 0), stdout, stderr }));
    // A CLI that exits without reading its input closes the pipe first: not this run's failure.
    child.stdin.on("error", () => undefined);
    child.stdin.end(input);
  });
}

/** The relay the fault tests cut links with (stop, restore, close); more faults in chaos/tcp-relay.ts. */
export { TcpRelay as SilentCut } from "../../chaos/tcp-relay.js";

/** Writes a policy file (YAML) into `dir`; returns its path, for the controller's --policy. */
export function writePolicy(dir: string, yaml: string): string {
  const file = join(dir, "policy.yaml");
  writeFileSync(file, yaml);
  return file;
}
