import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { LocalMesh, type RoleProcess } from "../../cli/launcher.js";
import { isTerminal } from "../../common/task-state.js";
import { ConnectionState, SubmitJobRequestSchema, type ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, hostIds, tempDir, type JobResult } from "./support.js";

/**
 * Each host appends its task id to a marker file when the command starts
 * (so spawns can be counted), waits, then writes random bytes to stdout and
 * their SHA-256 to stderr (so the client can check every byte).
 */
function workload(markDir: string, delay: string, bytes: number) {
  const script = [
    'echo "$REXMESH_TASK_ID" >> "$MARK/$REXMESH_TASK_ID"',
    `sleep ${delay}`,
    `f=$(mktemp); head -c ${bytes} /dev/urandom > "$f"; sha256sum "$f" | cut -d" " -f1 >&2; cat "$f"; rm -f "$f"`,
  ].join("; ");
  return { steps: [{ tool: { case: "shell" as const, value: { script } } }], env: { MARK: markDir } };
}

function spawns(markDir: string, taskId: string): number {
  const f = join(markDir, taskId);
  return existsSync(f) ? readFileSync(f, "utf8").trim().split("\n").length : 0;
}

/** The three invariants, for every host of a finished job. */
function checkInvariants(r: JobResult, markDir: string, expectSucceeded = true): void {
  for (const [host, task] of r.tasks) {
    expect(isTerminal(task.state), `${host} terminal`).toBe(true);
    expect(spawns(markDir, task.id), `${host} spawned at most once`).toBeLessThanOrEqual(1);
    if (expectSucceeded) expect(task.state, `${host}: ${task.message}`).toBe(TaskState.SUCCEEDED);
    if (task.state === TaskState.SUCCEEDED) {
      const out = r.stdout.get(host) ?? Buffer.alloc(0);
      expect(createHash("sha256").update(out).digest("hex"), `${host} output`).toBe(r.stderr.get(host)?.toString().trim());
    }
  }
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 20; ; delay = Math.min(delay * 2, 200)) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, delay));
  }
}

async function countState(client: Client<typeof ControllerService>, jobId: string, state: TaskState): Promise<number> {
  const { job } = await client.getJob({ jobId });
  return job?.counts.find((c) => c.state === state)?.count ?? 0;
}

/** Collects a job, or fails naming every task that is not terminal yet. */
async function finish(client: Client<typeof ControllerService>, jobId: string, timeoutMs = 45_000): Promise<JobResult> {
  const abort = AbortSignal.timeout(timeoutMs);
  try {
    return await collectJob(client, jobId, abort);
  } catch (err) {
    const { tasks } = await client.getJob({ jobId });
    const stuck = tasks.filter((t) => !isTerminal(t.state)).map((t) => `${t.hostId}:${TaskState[t.state]}@${t.proxy}(${t.outputChunks})`);
    throw new Error(`job ${jobId} did not finish: ${stuck.length} tasks open: ${stuck.slice(0, 20).join(" ")}`, { cause: err });
  }
}

async function kill(mesh: LocalMesh, p: RoleProcess, signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
  p.proc.kill(signal);
  await mesh.exited(p);
}

describe("faults: a proxy with 200 hosts behind it, and the controller", () => {
  const big = hostIds(200, "b");
  const mesh = new LocalMesh({
    dir: tempDir("faults"),
    regions: ["big"],
    hosts: big.map((id) => ({ id, region: "big" })),
    hostsPerProcess: 50,
    shareHostKey: true,
    daemonArgs: ["--heartbeat", "1s"],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  const marks = join(mesh.dir, "marks");

  beforeAll(async () => {
    await mesh.start();
    mkdirSync(marks, { recursive: true });
    await mesh.waitForHosts(big.length);
  }, 180_000);
  afterAll(() => mesh.stop());

  it("loses nothing and runs nothing twice when the proxy is killed with SIGKILL mid-job", async () => {
    const conn = clientOf(mesh);
    try {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, ...workload(marks, "1", 65536) }));
      await waitFor("tasks running", async () => (await countState(conn.client, job!.id, TaskState.RUNNING)) >= 20);
      await kill(mesh, mesh.proxies[0]!);
      await mesh.restart(mesh.proxies[0]!);
      const r = await finish(conn.client, job!.id);
      expect(r.tasks.size).toBe(200);
      checkInvariants(r, marks);
    } finally {
      conn.close();
    }
  });

  it("loses nothing and runs nothing twice when the controller is killed with SIGKILL mid-job", async () => {
    let conn = clientOf(mesh);
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, ...workload(marks, "1", 65536) }));
    await waitFor("tasks running", async () => (await countState(conn.client, job!.id, TaskState.RUNNING)) >= 20);
    conn.close();
    await kill(mesh, mesh.controller);
    await mesh.restart(mesh.controller);
    conn = clientOf(mesh);
    try {
      const r = await finish(conn.client, job!.id);
      expect(r.tasks.size).toBe(200);
      checkInvariants(r, marks);
    } finally {
      conn.close();
    }
  });
});

describe("faults: daemons", () => {
  const hosts = ["d1", "d2", "d3"];
  const mesh = new LocalMesh({
    dir: tempDir("faults-d"),
    regions: ["east"],
    hosts: hosts.map((id) => ({ id, region: "east" })),
    hostsPerProcess: 1,
    daemonArgs: ["--heartbeat", "1s"],
    proxyArgs: ["--heartbeat", "1s"],
  });
  const marks = join(mesh.dir, "marks");
  const daemonOf = (host: string) => mesh.daemons.find((d) => d.hosts.includes(host))!;
  let conn: ReturnType<typeof clientOf>;

  beforeAll(async () => {
    await mesh.start();
    mkdirSync(marks, { recursive: true });
    await mesh.waitForHosts(hosts.length);
    conn = clientOf(mesh);
  });
  afterAll(async () => {
    conn?.close();
    await mesh.stop();
  });

  const connected = async (host: string) => (await conn.client.listHosts({})).hosts.find((h) => h.id === host)?.connection === ConnectionState.CONNECTED;

  it("a daemon killed while its process runs reports INTERRUPTED, never re-runs it, and takes new work after restart", async () => {
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["d1"], ...workload(marks, "30", 16) }));
    await waitFor("task running", async () => (await countState(conn.client, job!.id, TaskState.RUNNING)) === 1);
    await kill(mesh, daemonOf("d1"));
    await mesh.restart(daemonOf("d1"));
    const r = await finish(conn.client, job!.id);
    const t = r.tasks.get("d1")!;
    expect(t.state).toBe(TaskState.INTERRUPTED);
    expect(spawns(marks, t.id)).toBe(1);
    const next = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["d1"], ...workload(marks, "0", 1000) }));
    const r2 = await finish(conn.client, next.job!.id);
    checkInvariants(r2, marks);
  });

  it("a host offline at submit gets its task when it returns; one offline past the deadline ends EXPIRED", async () => {
    await kill(mesh, daemonOf("d2"), "SIGTERM");
    await kill(mesh, daemonOf("d3"), "SIGTERM");
    await waitFor("hosts offline", async () => !(await connected("d2")) && !(await connected("d3")));
    const waits = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["d2"], deliveryDeadline: durationFromMs(120_000), ...workload(marks, "0", 1000) }));
    const expires = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["d3"], deliveryDeadline: durationFromMs(1500), ...workload(marks, "0", 1000) }));
    const expired = await finish(conn.client, expires.job!.id);
    expect(expired.tasks.get("d3")!.state).toBe(TaskState.EXPIRED);
    expect(expired.tasks.get("d3")!.message).toMatch(/deadline/);
    await mesh.restart(daemonOf("d2"));
    await mesh.restart(daemonOf("d3"));
    const delivered = await finish(conn.client, waits.job!.id);
    checkInvariants(delivered, marks);
    expect(spawns(marks, expired.tasks.get("d3")!.id)).toBe(0);
  });
});
