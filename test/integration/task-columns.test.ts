import { spawn } from "node:child_process";
import { once } from "node:events";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { Prng } from "../../chaos/prng.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { isTerminal } from "../../common/task-state.js";
import { LmdbJobStore } from "../../controller/lmdb-job-store.js";
import { MAX_PAGE_DELTAS } from "../../controller/lmdb-task-columns.js";
import { taskIdOf } from "../../controller/task-ids.js";
import { SubmitJobRequestSchema, type Task } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, faultMesh, hostIds, killRole, spawnsOf, tempDir, until } from "./support.js";

/**
 * A job's tasks kept as one column at the controller (pages written at
 * submit, a delta per page and turn after: controller/lmdb-task-columns.ts),
 * on real LMDB in real processes: a controller killed with SIGKILL mid-job,
 * while output is streaming in, recovers every task from its store alone to
 * at least the state its watchers were told (they hear of a change only once
 * it is durable), and the job then ends with every byte and no task run
 * twice. 300 hosts: the job's column spans two pages.
 */

const HOSTS = hostIds(300, "c");
/**
 * Hosts whose id ends in an even digit fail at once (exit 3); the others
 * print 60 lines, six every 0.9 s, holding after the 42nd (a line to
 * stderr every second, so that output still streams) until the test lets
 * them go (bounded: 120 s), so that they are still running when the
 * controller is killed however slowly a loaded machine started the burst
 * (a fixed 9 s run was over before the fast ones were all seen ended, once
 * in a CI run at load 30). Six lines per `sleep`, not one: 150 shells
 * forking a sleep every 0.15 s (1,000 forks a second) saturated a 2-core VM
 * whose fork is slow, and the daemons' links to the proxy dropped in every
 * run (their keepalive unanswered on starved event loops); with four per
 * 0.6 s the test beside another in CI still took up to 60 s to see its
 * burst started.
 */
const script = [
  'echo "$REXMESH_TASK_ID" >> "$MARK/$REXMESH_TASK_ID"',
  'case "$REXMESH_HOST_ID" in *[02468]) echo fast; exit 3;; esac',
  'i=0; while [ $i -lt 60 ]; do echo "line $i"; i=$((i+1)); if [ $((i % 6)) -eq 0 ]; then sleep 0.9; fi; if [ $i -eq 42 ]; then n=0; while [ ! -e "$MARK/release" ] && [ $n -lt 120 ]; do echo "held $n" >&2; sleep 1; n=$((n+1)); done; fi; done',
].join("; ");
const fast = (host: string) => /[02468]$/.test(host);
const slowOutput = Array.from({ length: 60 }, (_, i) => `line ${i}\n`).join("");

describe("task columns: a controller killed mid-job recovers every task from its store", () => {
  const { mesh, marks } = faultMesh("columns", "r1", HOSTS, 100);

  it("to at least what its watch reported, with the proxy frozen so that nothing is told again", async () => {
    let conn = clientOf(mesh);
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, steps: [{ tool: { case: "shell", value: { script } } }], env: { MARK: marks } }));
    const jobId = job!.id;
    // What the watch reported last, per host: durable by then.
    const watched = new Map<string, Task>();
    const outputSeen = new Set<string>();
    const watch = (async () => {
      for await (const batch of conn.client.watchJob({ jobId, noOutput: false })) {
        for (const t of batch.tasks) watched.set(t.hostId, t);
        for (const c of batch.output) outputSeen.add(c.taskId);
      }
    })().catch(() => undefined);
    const fastCount = HOSTS.filter(fast).length;
    await until("every fast task ended and output streaming from the slow ones", async () =>
      [...watched.values()].filter((t) => fast(t.hostId) && isTerminal(t.state)).length === fastCount &&
      [...watched.values()].filter((t) => !fast(t.hostId) && outputSeen.has(t.id)).length >= 20
        ? true
        : undefined,
    120_000);
    const proxy = mesh.proxies[0]!;
    // The proxy is frozen first: nothing it holds reaches the restarted controller until its state is read.
    proxy.proc.kill("SIGSTOP");
    try {
      await killRole(mesh, mesh.controller);
      await watch;
      conn.close();
      const told = new Map(watched);
      await mesh.restart(mesh.controller);
      conn = clientOf(mesh);
      const { tasks } = await conn.client.getJob({ jobId });
      expect(tasks.length).toBe(HOSTS.length);
      const recovered = new Map(tasks.map((t) => [t.hostId, t]));
      let ended = 0;
      for (const [host, was] of told) {
        const now = recovered.get(host)!;
        expect(now.id, host).toBe(was.id);
        if (isTerminal(was.state)) {
          ended++;
          expect([TaskState[now.state], now.exitCode], host).toEqual([TaskState[was.state], was.exitCode]);
        } else {
          expect(now.state, `${host}: ${TaskState[was.state]} was reported, ${TaskState[now.state]} recovered`).toBeGreaterThanOrEqual(was.state);
        }
        expect(now.outputChunks, `${host}'s output`).toBeGreaterThanOrEqual(was.outputChunks);
      }
      expect(ended).toBeGreaterThanOrEqual(fastCount);
      // Mid-job: some tasks were still running, their output coming in.
      expect(ended).toBeLessThan(HOSTS.length);
    } finally {
      proxy.proc.kill("SIGCONT");
      writeFileSync(join(marks, "release"), "");
    }
    try {
      const r = await collectJob(conn.client, jobId, AbortSignal.timeout(90_000));
      expect(r.tasks.size).toBe(HOSTS.length);
      for (const [host, task] of r.tasks) {
        expect(spawnsOf(marks, task.id), `${host} ran at most once`).toBe(1);
        if (fast(host)) {
          expect([TaskState[task.state], task.exitCode], host).toEqual([TaskState[TaskState.FAILED], 3]);
          expect(r.stdout.get(host)?.toString(), host).toBe("fast\n");
        } else {
          expect(TaskState[task.state], `${host}: ${task.message}`).toBe(TaskState[TaskState.SUCCEEDED]);
          expect(r.stdout.get(host)?.toString(), host).toBe(slowOutput);
        }
      }
    } finally {
      conn.close();
    }
  }, 180_000);
});


/**
 * The tasks one step of the writer below changes: two of its 300 every step
 * (a page's deltas folded into one delta from memory), and 60 of the first
 * page every fifth (folded into the page). The same function runs in the
 * writer (as its source) and here.
 */
function changesAt(step: number): number[] {
  const out = [step % 8, 256 + (step % 5)];
  if (step % 5 === 0) for (let k = 0; k < 60; k++) out.push((step * 7 + k * 4) % 256);
  return [...new Set(out)];
}

/** A process that keeps changing a column job's tasks (each change with an output chunk) and prints each step once durable. */
const writer = `
const [dist, dir] = process.argv.slice(1);
const { LmdbEnv } = await import(dist + "/common/lmdb.js");
const { LmdbJobStore } = await import(dist + "/controller/lmdb-job-store.js");
const { taskIdOf } = await import(dist + "/controller/task-ids.js");
const changesAt = ${changesAt.toString()};
const store = new LmdbJobStore(new LmdbEnv({ path: dir, maxBytes: 256 << 20 }));
const jobId = "j01kkilled000";
let job = store.getJob(jobId);
if (!job) {
  const tasks = Array.from({ length: 300 }, (_, i) => ({ id: taskIdOf(jobId, i), jobId, tenant: "acme", hostId: "h" + i, region: "r1", proxy: "p1", state: 5, signal: "", message: "", updatedAt: 0, outputChunks: 0, outputTruncated: false, released: true, proxies: ["p1"] }));
  job = { id: jobId, tenant: "acme", submittedBy: "alice", createdAt: 1, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 0, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: tasks.map((t) => t.id), outputLimitBytes: 0 };
  await store.putJob(job, tasks);
}
const live = store.tasksOf(job);
let step = Math.max(...live.map((t) => t.updatedAt));
for (;;) {
  step++;
  const writes = changesAt(step).map((i) => {
    const t = live[i];
    t.updatedAt = step;
    t.outputChunks++;
    return store.appendOutput({ ...t }, { taskId: t.id, seq: BigInt(t.outputChunks), stream: 1, data: Buffer.from(step + "\\n") });
  });
  const s = step;
  Promise.all(writes).then(() => process.stdout.write(s + "\\n"));
  await new Promise((r) => setImmediate(r));
}
`;

describe("task columns: a store killed with SIGKILL while it folds", () => {
  it("recovers every task as one step left it, each counted chunk stored, each page within its bound, again and again", async () => {
    const dir = tempDir("columns-kill");
    const dist = join(import.meta.dirname, "../../dist");
    const jobId = "j01kkilled000";
    // A seeded schedule of kills: a failing run replays.
    const prng = new Prng(20_251_206);
    let recovered = 0;
    for (let kill = 0; kill < 6; kill++) {
      const child = spawn(process.execPath, ["--input-type=module", "-e", writer, dist, dir], { stdio: ["ignore", "pipe", "inherit"] });
      let acked = 0;
      let out = "";
      child.stdout.setEncoding("utf8");
      const pastRecovered = recovered + prng.int(40, 240);
      const enough = new Promise<void>((resolve) =>
        child.stdout.on("data", (d: string) => {
          out += d;
          const lines = out.split("\n");
          out = lines.pop()!;
          for (const l of lines) acked = Math.max(acked, Number(l));
          if (acked >= pastRecovered) resolve();
        }),
      );
      const exited = once(child, "exit");
      await Promise.race([enough, exited.then(() => Promise.reject(new Error("the writer exited by itself")))]);
      child.kill("SIGKILL");
      await exited;

      const env = new LmdbEnv({ path: dir, maxBytes: 256 << 20 });
      const store = new LmdbJobStore(env);
      const tasks = store.tasksOf(store.getJob(jobId)!);
      const last = Math.max(...tasks.map((t) => t.updatedAt));
      expect(last, "every step acknowledged is recovered").toBeGreaterThanOrEqual(acked);
      // As step `last` left them: each task's last change and its count of changes, each chunk of them stored.
      const lastChange = new Array<number>(300).fill(0);
      const changes = new Array<number>(300).fill(0);
      for (let step = 1; step <= last; step++) {
        for (const i of changesAt(step)) {
          lastChange[i] = step;
          changes[i]!++;
        }
      }
      expect(tasks.map((t) => t.updatedAt)).toEqual(lastChange);
      expect(tasks.map((t) => t.outputChunks)).toEqual(changes);
      expect(tasks.map((t) => store.readOutput(t.id, 1, 1 << 20).length)).toEqual(changes);
      const deltas = env.db("task-deltas");
      for (const page of [0, 1]) expect(deltas.getKeysCount({ start: [jobId, page], end: [jobId, page + 1] }), `page ${page}`).toBeLessThanOrEqual(MAX_PAGE_DELTAS);
      expect(store.getTask(taskIdOf(jobId, 299))).toMatchObject({ updatedAt: lastChange[299] });
      recovered = last;
      await store.close();
    }
  }, 120_000);
});
