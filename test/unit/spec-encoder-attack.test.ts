/**
 * The SpecEncoder's cache (common/task-signing.ts) and JobManager.taskSpec
 * (controller/jobs.ts) against the orders tasks really leave in: the tasks
 * of several jobs interleaved (a proxy's reconnect sends what it holds,
 * job by job in no order), document runs whose steps are rendered per host,
 * a rerun that shares its job's steps and environment objects. Every task's
 * bytes must decode to its own spec.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { TaskSigner } from "../../common/task-signing.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import type { JobRecord, TaskRecord, TaskSteps } from "../../controller/model.js";
import { TaskSpecSchema, TaskState, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { counterIds, execStep, testSigning } from "./support.js";

/** Seeded floats in [0, 1) (chaos/prng.ts), so a failure names its seed. */
function rng(seed: number): () => number {
  const prng = new Prng(seed);
  return () => prng.next();
}

describe("SpecEncoder through JobManager.taskSpec", () => {
  it("gives each task its own steps and its own job's fields, whatever the order tasks of document runs, reruns and plain jobs leave in (seeded)", async () => {
    const clock = new ManualClock();
    const store = new MemoryJobStore();
    const jobs = new JobManager({ store, inventory: new Inventory(), clock, ids: counterIds(), log: silentLogger });
    const signer: TaskSigner = testSigning().signer;
    const plain: JobRecord = { id: "j1", tenant: "acme", submittedBy: "alice", createdAt: 1000, steps: [execStep("echo", "one")], env: { A: "1" }, workingDir: "/", stdin: new Uint8Array([1]), timeoutMs: 5000, deliverBy: 61_000, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: [], outputLimitBytes: 0 };
    // A rerun shares the steps and environment objects of its job (controller/rerun.ts); submitted in the same millisecond, only its id differs.
    const rerun: JobRecord = { ...plain, id: "j2" };
    const doc: JobRecord = { ...plain, id: "j3", steps: [], document: "d@1", env: {} };
    const doc2: JobRecord = { ...doc, id: "j4" };
    const tasks: [JobRecord, TaskRecord][] = [];
    const steps = new Map<string, TaskSteps>();
    for (const job of [plain, rerun, doc, doc2]) {
      const own: TaskRecord[] = [];
      for (let h = 0; h < 20; h++) {
        const t: TaskRecord = { id: `${job.id}-t${h}`, jobId: job.id, tenant: "acme", hostId: `h${h}`, region: "eu", proxy: "", state: TaskState.PENDING, signal: "", message: "", updatedAt: 0, outputChunks: 0, outputTruncated: false };
        own.push(t);
        tasks.push([job, t]);
        // Rendered per host; two hosts share identical text but never objects, and some share their Step objects across jobs.
        if (job.document) steps.set(t.id, { run: [execStep("echo", job.id, `host ${h % 3}`)], shown: [] });
      }
      job.taskIds = own.map((t) => t.id);
      await store.putJob(job, own, new Map([...steps].filter(([id]) => id.startsWith(`${job.id}-`))));
    }
    const expected = (job: JobRecord, t: TaskRecord): TaskSpec =>
      create(TaskSpecSchema, {
        taskId: t.id,
        jobId: job.id,
        tenant: job.tenant,
        hostId: t.hostId,
        steps: job.document ? steps.get(t.id)!.run : job.steps,
        env: job.env,
        workingDir: job.workingDir,
        stdin: job.stdin,
        timeout: { seconds: BigInt(job.timeoutMs / 1000), nanos: 0 },
        deliverBy: { seconds: BigInt(Math.floor(job.deliverBy / 1000)), nanos: 0 },
        idempotent: job.idempotent,
        createdAt: { seconds: BigInt(Math.floor(job.createdAt / 1000)), nanos: 0 },
      });
    for (let seed = 1; seed <= 20; seed++) {
      const r = rng(seed);
      // Runs of one job's tasks of random length, jobs in random order: as slices, reconnects and failovers send them.
      for (let i = 0; i < 200; ) {
        const [job] = tasks[Math.floor(r() * tasks.length)]!;
        const mine = tasks.filter(([j]) => j === job);
        for (let n = 1 + Math.floor(r() * 5); n > 0; n--, i++) {
          const [, t] = mine[Math.floor(r() * mine.length)]!;
          const bytes = signer.prepare(jobs.taskSpec(job, t)).spec;
          expect(fromBinary(TaskSpecSchema, new Uint8Array(bytes)), `seed ${seed}, ${t.id}`).toEqual(fromBinary(TaskSpecSchema, toBinary(TaskSpecSchema, expected(job, t))));
        }
      }
    }
  });
});
