import { createHash } from "node:crypto";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { LocalMesh, type RoleProcess } from "../../cli/launcher.js";
import { isTerminal } from "../../common/task-state.js";
import { ConnectionState, SubmitJobRequestSchema, type ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { Code, ConnectError } from "@connectrpc/connect";
import { clientOf, collectJob, faultMesh, hostIds, killRole, SilentCut, spawnsOf, tempDir, until, type JobResult } from "./support.js";
import { testCa } from "../test-ca.js";

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


/** The three invariants, for every host of a finished job. */
function checkInvariants(r: JobResult, markDir: string, expectSucceeded = true): void {
  for (const [host, task] of r.tasks) {
    expect(isTerminal(task.state), `${host} terminal`).toBe(true);
    expect(spawnsOf(markDir, task.id), `${host} spawned at most once`).toBeLessThanOrEqual(1);
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

/**
 * Tasks the daemons have taken (DELIVERED or later): the fault strikes while
 * they run. (Counting RUNNING alone can miss them: a daemon serving 50 hosts
 * may report RUNNING and the end of a short task in one frame.)
 */
async function started(client: Client<typeof ControllerService>, jobId: string): Promise<number> {
  const { job } = await client.getJob({ jobId });
  return (job?.counts ?? []).filter((c) => c.state >= TaskState.DELIVERED).reduce((n, c) => n + c.count, 0);
}


describe("faults: a proxy with 200 hosts behind it, and the controller", () => {
  const { mesh, marks } = faultMesh("faults", "big", hostIds(200, "b"), 50);

  it("loses nothing and runs nothing twice when the proxy is killed with SIGKILL mid-job", async () => {
    const conn = clientOf(mesh);
    try {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, ...workload(marks, "1", 65536) }));
      await waitFor("tasks started", async () => (await started(conn.client, job!.id)) >= 20);
      await killRole(mesh, mesh.proxies[0]!);
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
    await waitFor("tasks started", async () => (await started(conn.client, job!.id)) >= 20);
    conn.close();
    await killRole(mesh, mesh.controller);
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
    ca: testCa(),
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
    await killRole(mesh, daemonOf("d1"));
    await mesh.restart(daemonOf("d1"));
    const r = await finish(conn.client, job!.id);
    const t = r.tasks.get("d1")!;
    expect(t.state).toBe(TaskState.INTERRUPTED);
    expect(spawnsOf(marks, t.id)).toBe(1);
    const next = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["d1"], ...workload(marks, "0", 1000) }));
    const r2 = await finish(conn.client, next.job!.id);
    checkInvariants(r2, marks);
  });

  it("a host offline at submit gets its task when it returns; one offline past the deadline ends EXPIRED", async () => {
    await killRole(mesh, daemonOf("d2"), "SIGTERM");
    await killRole(mesh, daemonOf("d3"), "SIGTERM");
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
    expect(spawnsOf(marks, expired.tasks.get("d3")!.id)).toBe(0);
  });
});

describe("faults: a datacenter cut off from the controller", () => {
  const hosts = hostIds(100, "c");
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("faults-cut"),
    regions: ["dc"],
    hosts: hosts.map((id) => ({ id, region: "dc" })),
    hostsPerProcess: 50,
    shareHostKey: true,
    daemonArgs: ["--heartbeat", "1s"],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  const marks = join(mesh.dir, "marks");
  let relay: SilentCut;

  beforeAll(async () => {
    mesh.prepare();
    mkdirSync(marks, { recursive: true });
    await mesh.startController();
    relay = await SilentCut.start(mesh.controllerAddress);
    mesh.controllerAddressForProxies = relay.address;
    await mesh.startProxies();
    await mesh.startDaemons();
    await mesh.waitForHosts(hosts.length);
  }, 180_000);
  afterAll(async () => {
    relay?.close();
    await mesh.stop();
  });

  it("keeps working at the edge while the link is silent, keeps queueing at the controller, and converges when it returns", async () => {
    const conn = clientOf(mesh);
    try {
      // 10 jobs × 100 hosts = 1,000 tasks; each host runs 4 at a time, so most wait at the proxy or daemon.
      const before = [];
      for (let i = 0; i < 10; i++) before.push((await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, ...workload(marks, "0.3", 4096) }))).job!.id);
      relay.stop();
      // The controller notices the silence through heartbeats and sees the region's hosts go away.
      await waitFor("the cut noticed", async () => (await conn.client.listHosts({})).hosts.every((h) => h.connection !== ConnectionState.CONNECTED), 30_000);
      // New work for the cut-off region queues at the controller.
      const during = [];
      for (let i = 0; i < 2; i++) during.push((await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, ...workload(marks, "0", 1024) }))).job!.id);
      expect(await countState(conn.client, during[0]!, TaskState.PENDING)).toBe(100);
      // Meanwhile the edge goes on: processes run and finish without the controller.
      await waitFor("work done at the edge", async () => {
        const { readdirSync } = await import("node:fs");
        return readdirSync(marks).length >= 300;
      }, 60_000);
      relay.restore();
      for (const jobId of [...before, ...during]) {
        const r = await finish(conn.client, jobId, 90_000);
        expect(r.tasks.size).toBe(100);
        checkInvariants(r, marks);
      }
    } finally {
      conn.close();
    }
  }, 180_000);

});

describe("faults: a store that fills up", () => {
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("faults-full"),
    regions: ["east"],
    hosts: [{ id: "f1", region: "east" }],
    controllerArgs: ["--store-size", String(2 * 1024 * 1024)],
  });

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
    // The host goes away, so every accepted task stays queued at the controller: once the controller knows it is
    // gone (a job submitted before its proxy said so would be handed to the proxy, QUEUED, not PENDING).
    await killRole(mesh, mesh.daemons[0]!, "SIGTERM");
    const conn = clientOf(mesh);
    try {
      await until("the controller to see f1 gone", async () => ((await conn.client.listHosts({})).hosts.find((h) => h.id === "f1")?.connection === ConnectionState.DISCONNECTED ? true : undefined));
    } finally {
      conn.close();
    }
  });
  afterAll(() => mesh.stop());

  it("refuses new work with RESOURCE_EXHAUSTED and keeps everything it accepted across a restart", async () => {
    let conn = clientOf(mesh);
    const accepted: string[] = [];
    let refusal: ConnectError | undefined;
    const stdin = new Uint8Array(256 * 1024).fill(7);
    for (let i = 0; i < 64 && !refusal; i++) {
      try {
        const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["f1"], stdin, steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }));
        accepted.push(job!.id);
      } catch (err) {
        refusal = ConnectError.from(err);
      }
    }
    expect(accepted.length).toBeGreaterThan(0);
    expect(refusal?.code).toBe(Code.ResourceExhausted);
    expect(refusal?.rawMessage).toMatch(/refused: the store holds .* of its 2\.0 MiB limit/);
    // Still answering, and still refusing, rather than crashing.
    const again = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["f1"], stdin, steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] })).catch((e) => ConnectError.from(e));
    expect((again as ConnectError).code).toBe(Code.ResourceExhausted);
    conn.close();

    await killRole(mesh, mesh.controller);
    await mesh.restart(mesh.controller);
    conn = clientOf(mesh);
    try {
      for (const jobId of accepted) {
        const { job, tasks } = await conn.client.getJob({ jobId });
        expect(job?.taskCount).toBe(1);
        expect(tasks[0]!.state).toBe(TaskState.PENDING);
      }
      const { jobs } = await conn.client.listJobs({ limit: 1000 });
      expect(jobs.map((j) => j.id).sort()).toEqual([...accepted].sort());
    } finally {
      conn.close();
    }
  });
});
