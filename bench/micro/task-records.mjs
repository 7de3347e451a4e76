// node bench/micro/task-records.mjs [--tasks 10000]: the controller's floor for a durable record
// per host and job, on this machine's disk: the CPU (user + system, this process and LMDB's
// write thread) of storing a job with N task records in one commit (as a submit does), then
// storing each task's record again at its end (as a host's answer does, in batches of 500 per
// commit), with the controller's own store (controller/lmdb-job-store.ts, msgpack in LMDB).
// The controller as built in dist/ (npm run build first).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { LmdbEnv } from "../../dist/common/lmdb.js";
import { LmdbJobStore } from "../../dist/controller/lmdb-job-store.js";

const { values } = parseArgs({ options: { tasks: { type: "string", default: "10000" } } });
const N = Number(values.tasks);
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1000; };
const rounds = [];
for (let round = 0; round < 5; round++) {
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-records-"));
  const env = new LmdbEnv({ path: dir, maxBytes: 1 << 30 });
  const store = new LmdbJobStore(env);
  const jobId = `j-${round}`;
  const tasks = Array.from({ length: N }, (_, i) => ({
    id: `t-${round}-${(1e6 + i).toString(36)}-4f1c2a9e`, jobId, tenant: "acme", hostId: `host-${String(i).padStart(5, "0")}.r1.example`, region: i % 2 ? "r1" : "r2", proxy: "",
    state: 1, signal: "", message: "", updatedAt: 1_700_000_000_000, outputChunks: 0, outputTruncated: false,
  }));
  const job = { id: jobId, tenant: "acme", submittedBy: "alice", createdAt: 1_700_000_000_000, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 0, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: tasks.map((t) => t.id), outputLimitBytes: 0 };
  const c0 = cpu();
  const t0 = performance.now();
  await store.putJob(job, tasks);
  const c1 = cpu();
  for (let i = 0; i < N; i += 500) {
    await Promise.all(tasks.slice(i, i + 500).map((t) => store.putTask({ ...t, state: 10, exitCode: 0, message: "pong", updatedAt: t.updatedAt + 1 })));
  }
  const c2 = cpu();
  rounds.push({ submitUs: ((c1 - c0) * 1000) / N, endUs: ((c2 - c1) * 1000) / N, wallMs: performance.now() - t0 });
  await env.close();
  rmSync(dir, { recursive: true, force: true });
}
const warm = rounds.slice(1);
const med = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`${N} task records, rounds 2-5 (median): stored at submit ${med(warm.map((r) => r.submitUs)).toFixed(1)} µs CPU per task, stored again at its end ${med(warm.map((r) => r.endUs)).toFixed(1)} µs; wall ${med(warm.map((r) => r.wallMs)).toFixed(0)} ms per round`);
