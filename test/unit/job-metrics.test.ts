import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Metrics } from "../../common/metrics.js";
import { Inventory } from "../../controller/inventory.js";
import { jobMetrics } from "../../controller/job-metrics.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type ProxyPort } from "../../controller/jobs.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, counterIds, execStep, operator, status, submitRequest } from "./support.js";

const port: ProxyPort = { name: "px1", region: "eu", sendTask: () => undefined, sendCancel: () => undefined };

const sample = (text: string, series: string) => {
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
};

describe("job and task histograms", () => {
  it("record, from the job's submission, each task's end by state, the first output of each task and the job's end", async () => {
    const clock = new ManualClock();
    const inventory = new Inventory();
    const metrics = new Metrics();
    const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids: counterIds(), log: silentLogger, observe: jobMetrics(metrics) });
    jobs.start();
    jobs.proxyConnected(port);
    for (const id of ["h1", "h2"]) jobs.hostConnected(inventory.connected({ id, tenant: "acme" }, "eu", "px1", clock.now()));
    const job = await jobs.submit(operator("acme"), submitRequest({ hostIds: ["h1", "h2"], steps: [execStep("echo", "hi")] }));
    const [a, b] = job.taskIds as [string, string];

    clock.advance(1500);
    // Out of order: the task's first output is whichever chunk is stored first.
    await jobs.applyOutput(port, chunk(a, 2, "b"));
    clock.advance(250);
    await jobs.applyOutput(port, chunk(a, 1, "a"));
    await jobs.applyStatus(port, status(a, TaskState.SUCCEEDED, { exitCode: 0, outputChunks: 2n }));
    let text = await metrics.render();
    expect(sample(text, "rexmesh_task_first_output_seconds_count")).toBe(1);
    expect(sample(text, "rexmesh_task_first_output_seconds_sum")).toBe(1.5);
    expect(sample(text, 'rexmesh_task_duration_seconds_sum{state="SUCCEEDED"}')).toBe(1.75);
    expect(sample(text, "rexmesh_job_duration_seconds_count")).toBe(0);

    clock.advance(1250);
    await jobs.applyStatus(port, status(b, TaskState.FAILED, { exitCode: 3 }));
    await new Promise((r) => setImmediate(r));
    text = await metrics.render();
    expect(sample(text, 'rexmesh_task_duration_seconds_count{state="FAILED"}')).toBe(1);
    expect(sample(text, 'rexmesh_task_duration_seconds_bucket{le="2.5",state="FAILED"}')).toBe(0);
    expect(sample(text, 'rexmesh_task_duration_seconds_bucket{le="5",state="FAILED"}')).toBe(1);
    expect(sample(text, "rexmesh_task_first_output_seconds_count")).toBe(1);
    expect(sample(text, "rexmesh_job_duration_seconds_count")).toBe(1);
    expect(sample(text, "rexmesh_job_duration_seconds_sum")).toBe(3);
    jobs.stop();
  });
});
