// node bench/micro/task-records.mjs [--tasks 10000] [--rounds 6] [--per-turn 500] [--order in-order|scattered]: the controller's durable cost per
// host and job, on this machine's disk: the CPU (user + system, this process and LMDB's write
// thread) of storing a job with N tasks in one commit (as a submit does), then each task's end (as
// a host's answer does, 500 per event-loop turn), then the job finished, with the controller's own
// store (controller/lmdb-job-store.ts). Two layouts, alternating round by round in one process:
//   records: task ids of the old form, a record per task at submit and again at its end;
//   column:  task ids that name their job and place (controller/task-ids.ts), the job's tasks as
//            one column (pages at submit, one delta per turn, folded when the job finishes).
// Both write a host-index entry per task at submit (a host's history); "index only" measures
// that entry alone. "stream" is a long job's output: a column job whose first 8 tasks each append
// a chunk per event-loop turn for --turns turns (a delta per turn on one page), reported as µs of
// CPU per chunk, then µs to read one of those tasks and the whole job from a reopened store (as
// recovery or a finished job's listing does). --layouts picks some. The controller as built in
// dist/ (npm run build first).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { LmdbEnv } from "../../dist/common/lmdb.js";
import { LmdbJobStore } from "../../dist/controller/lmdb-job-store.js";
import { taskIdOf } from "../../dist/controller/task-ids.js";

const { values } = parseArgs({ options: { tasks: { type: "string", default: "10000" }, rounds: { type: "string", default: "6" }, turns: { type: "string", default: "2000" }, layouts: { type: "string", default: "records,column,index only" }, "per-turn": { type: "string", default: "500" }, order: { type: "string", default: "in-order" } } });
// --per-turn K --order scattered: ends come K per turn in a seeded random order over the whole job, as a fleet's
// answers do (a proxy's frame carries the hosts that answered within a turn, wherever they are in the job).
const PER_TURN = Number(values["per-turn"]);
const endOrder = (n) => {
  const order = Array.from({ length: n }, (_, i) => i);
  if (values.order !== "scattered") return order;
  let seed = 42;
  const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
};
const N = Number(values.tasks);
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };
const turn = () => new Promise((r) => setImmediate(r));

async function round(layout, r) {
  if (layout === "stream") return stream(r);
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-records-"));
  const env = new LmdbEnv({ path: dir, maxBytes: 1 << 30 });
  const store = new LmdbJobStore(env);
  const jobId = `j01hzzzzzz${String(r).padStart(3, "0")}abcdefgh`;
  const id = (i) => (layout === "records" ? `t-${r}-${(1e6 + i).toString(36)}-4f1c2a9e` : taskIdOf(jobId, i));
  const tasks = Array.from({ length: N }, (_, i) => ({
    id: id(i), jobId, tenant: "acme", hostId: `host-${String(i).padStart(5, "0")}.r1.example`, region: i % 2 ? "r1" : "r2", proxy: "p1",
    state: 1, signal: "", message: "", updatedAt: 1_700_000_000_000, outputChunks: 0, outputTruncated: false, released: true, proxies: ["p1"],
  }));
  const job = { id: jobId, tenant: "acme", submittedBy: "alice", createdAt: 1_700_000_000_000, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 0, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: tasks.map((t) => t.id), outputLimitBytes: 0 };
  const c0 = cpu();
  const t0 = performance.now();
  const index = env.db("host-tasks");
  if (layout === "index only") await Promise.all(tasks.map((t) => index.put([t.tenant, t.hostId, t.id], null)));
  else await store.putJob(job, tasks);
  const c1 = cpu();
  let c2 = c1;
  if (layout !== "index only") {
    const order = endOrder(N);
    for (let i = 0; i < N; i += PER_TURN) {
      await Promise.all(order.slice(i, i + PER_TURN).map((k) => tasks[k]).map((t) => store.putTask({ ...t, state: 10, exitCode: 0, message: "pong", updatedAt: t.updatedAt + 1, proxies: [] })));
      await turn();
    }
    c2 = cpu();
    await store.putJob({ ...job, finishedAt: job.createdAt + 5 });
    if (store.getTask(tasks[N - 1].id)?.state !== 10) throw new Error(`${layout}: the last task did not read back ended`);
  }
  const c3 = cpu();
  await env.close();
  rmSync(dir, { recursive: true, force: true });
  return { submitUs: ((c1 - c0) * 1000) / N, endUs: ((c2 - c1) * 1000) / N, finishUs: ((c3 - c2) * 1000) / N, wallMs: performance.now() - t0 };
}

async function stream(r) {
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-records-"));
  const open = () => { const env = new LmdbEnv({ path: dir, maxBytes: 1 << 30 }); return { env, store: new LmdbJobStore(env) }; };
  let { env, store } = open();
  const jobId = `j01hzzzzzy${String(r).padStart(3, "0")}abcdefgh`;
  const tasks = Array.from({ length: 1000 }, (_, i) => ({
    id: taskIdOf(jobId, i), jobId, tenant: "acme", hostId: `host-${String(i).padStart(5, "0")}.r1.example`, region: "r1", proxy: "p1",
    state: 5, signal: "", message: "", updatedAt: 1_700_000_000_000, outputChunks: 0, outputTruncated: false, released: true, proxies: ["p1"],
  }));
  const job = { id: jobId, tenant: "acme", submittedBy: "alice", createdAt: 1_700_000_000_000, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 0, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: tasks.map((t) => t.id), outputLimitBytes: 0 };
  await store.putJob(job, tasks);
  const data = Buffer.from("a line of output\n");
  const turns = Number(values.turns);
  const c0 = cpu();
  const writes = [];
  for (let k = 0; k < turns; k++) {
    for (const t of tasks.slice(0, 8)) {
      t.outputChunks++;
      writes.push(store.appendOutput({ ...t }, { taskId: t.id, seq: BigInt(t.outputChunks), stream: 1, data }));
    }
    await turn();
  }
  await Promise.all(writes);
  const c1 = cpu();
  await env.close();
  ({ env, store } = open());
  const t0 = performance.now();
  const one = store.getTask(tasks[3].id);
  const t1 = performance.now();
  ({ env, store } = (await env.close(), open()));
  const t2 = performance.now();
  const all = store.tasksOf(job);
  const t3 = performance.now();
  if (one?.outputChunks !== turns || all[7].outputChunks !== turns) throw new Error("stream: a task did not read back its last count");
  await env.close();
  rmSync(dir, { recursive: true, force: true });
  return { submitUs: 0, endUs: ((c1 - c0) * 1000) / (turns * 8), finishUs: 0, readTaskUs: (t1 - t0) * 1000, readJobUs: (t3 - t2) * 1000, wallMs: t3 - t0 };
}

const layouts = values.layouts.split(",");
const results = Object.fromEntries(layouts.map((l) => [l, []]));
for (let r = 0; r < Number(values.rounds); r++) for (const l of layouts) results[l].push(await round(l, r));
const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`${N} tasks, rounds 2-${values.rounds} (median), µs of CPU per task:`);
for (const l of layouts) {
  const warm = results[l].slice(1);
  if (l === "stream") {
    console.log(`  stream     a chunk ${med(warm.map((x) => x.endUs)).toFixed(1).padStart(5)}  then, reopened: a task read ${med(warm.map((x) => x.readTaskUs)).toFixed(0)} µs, the job's 1,000 tasks ${med(warm.map((x) => x.readJobUs)).toFixed(0)} µs (${values.turns} turns)`);
    continue;
  }
  console.log(`  ${l.padEnd(10)} submit ${med(warm.map((x) => x.submitUs)).toFixed(1).padStart(5)}  end ${med(warm.map((x) => x.endUs)).toFixed(1).padStart(5)}  job finished ${med(warm.map((x) => x.finishUs)).toFixed(1).padStart(5)}  wall ${med(warm.map((x) => x.wallMs)).toFixed(0)} ms per round`);
}
