import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { JobPrinter } from "../../cli/printer.js";
import { JobSchema, TaskSchema, WatchJobResponseSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputChunkSchema, OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const enc = (s: string) => new TextEncoder().encode(s);
const task = (id: string, host: string, state: TaskState) => create(TaskSchema, { id, hostId: host, state, exitCode: state === TaskState.SUCCEEDED ? 0 : 1 });
const chunk = (taskId: string, seq: number, text: string) => create(OutputChunkSchema, { taskId, seq: BigInt(seq), stream: OutputStream.STDOUT, data: enc(text) });

describe("JobPrinter", () => {
  it("--group collapses identical output into one block with the host list", () => {
    let out = "";
    const p = new JobPrinter({ json: false, write: (s) => (out += s), group: true });
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 3 }), tasks: [task("t1", "a", TaskState.RUNNING), task("t2", "b", TaskState.RUNNING), task("t3", "c", TaskState.RUNNING)] }));
    p.handle(create(WatchJobResponseSchema, { output: [chunk("t1", 1, "same\n"), chunk("t2", 1, "sa"), chunk("t2", 2, "me\n"), chunk("t3", 1, "different\n")] }));
    expect(out).toBe(""); // nothing live while grouping
    p.handle(create(WatchJobResponseSchema, { tasks: [task("t1", "a", TaskState.SUCCEEDED), task("t2", "b", TaskState.SUCCEEDED), task("t3", "c", TaskState.FAILED)] }));
    p.summary();
    expect(out).toContain("==== 2 hosts: a, b\nsame\n==== 1 host: c\ndifferent\n");
  });

  it("keeps a progress line of done, failed and pending hosts", () => {
    let out = "";
    const p = new JobPrinter({ json: false, write: (s) => (out += s), progress: true });
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 4 }), tasks: [task("t1", "a", TaskState.SUCCEEDED), task("t2", "b", TaskState.FAILED), task("t3", "c", TaskState.RUNNING), task("t4", "d", TaskState.PENDING)] }));
    expect(p.progressLine()).toBe("[############------------] 2/4 done, 1 failed, 2 pending");
    expect(out).toContain("\r\x1b[K[############------------] 2/4 done, 1 failed, 2 pending");
  });
});
