import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { JobPrinter, taskLine } from "../../cli/printer.js";
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
    expect(out).toContain("==== 2 hosts: a, b\nsame\n==== 1 host: c (FAILED, exit 1)\ndifferent\n");
  });

  it("keeps a progress line of done, failed and pending hosts", () => {
    let out = "";
    const p = new JobPrinter({ json: false, write: (s) => (out += s), progress: true });
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 4 }), tasks: [task("t1", "a", TaskState.SUCCEEDED), task("t2", "b", TaskState.FAILED), task("t3", "c", TaskState.RUNNING), task("t4", "d", TaskState.PENDING)] }));
    expect(p.progressLine()).toBe("[############------------] 2/4 done, 1 failed, 2 pending");
    expect(out).toContain("\r\x1b[K[############------------] 2/4 done, 1 failed, 2 pending");
  });

  it("--json follows the job's life: a task's end after its last output, the job's DONE after its last task's end", () => {
    let out = "";
    const p = new JobPrinter({ json: true, write: (s) => (out += s) });
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 1, state: 1 }), tasks: [task("t1", "a", TaskState.RUNNING)] }));
    // The last batch of a watch carries the finished job, the task's end and its last chunk together.
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 1, state: 2 }), tasks: [task("t1", "a", TaskState.SUCCEEDED)], output: [chunk("t1", 1, "last\n")] }));
    const events = out
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { type: string; job?: { state: string }; task?: { state: string } })
      .map((e) => (e.type === "job" ? `job:${e.job!.state}` : e.type === "task" ? `task:${e.task!.state}` : e.type));
    expect(events).toEqual(["job:RUNNING", "task:RUNNING", "output", "task:SUCCEEDED", "job:DONE"]);
  });

  it("--json announces a job first even when it is done before the watch sees it running", () => {
    let out = "";
    const p = new JobPrinter({ json: true, write: (s) => (out += s) });
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 1, state: 2 }), tasks: [task("t1", "a", TaskState.SUCCEEDED)], output: [chunk("t1", 1, "fast\n")] }));
    const events = out
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { type: string; job?: { state: string }; task?: { state: string } })
      .map((e) => (e.type === "job" ? `job:${e.job!.state}` : e.type === "task" ? `task:${e.task!.state}` : e.type));
    expect(events).toEqual(["job:DONE", "output", "task:SUCCEEDED", "job:DONE"]);
  });

  it("says in the summary when a host's output is incomplete and what a lost host reported later", () => {
    let out = "";
    const p = new JobPrinter({ json: false, write: (s) => (out += s) });
    const incomplete = create(TaskSchema, { id: "t1", hostId: "a", state: TaskState.SUCCEEDED, exitCode: 0, outputChunks: 3n, outputChunksExpected: 5n, outputComplete: false });
    const lost = create(TaskSchema, { id: "t2", hostId: "b", state: TaskState.LOST, message: "host b unreachable", lateReport: { state: TaskState.SUCCEEDED, exitCode: 0 } });
    p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 2, state: 2 }), tasks: [incomplete, lost] }));
    p.summary();
    expect(out).toContain("a SUCCEEDED: exit 0 (output incomplete: 3 of 5 chunks received so far)");
    expect(out).toContain("b LOST: host b unreachable; the host reported later: SUCCEEDED (exit 0)");
  });

  it("a watch started again replays the job: nothing is printed twice, and the replay is not news", () => {
    let out = "";
    const p = new JobPrinter({ json: true, write: (s) => (out += s) });
    const first = create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 1, state: 1 }), tasks: [task("t1", "a", TaskState.RUNNING)], output: [chunk("t1", 1, "one\n")] });
    expect(p.handle(first)).toBe(true);
    // The controller restarted; the new watch replays the job from its start.
    expect(p.handle(first)).toBe(false);
    expect(p.handle(create(WatchJobResponseSchema, { tasks: [task("t1", "a", TaskState.RUNNING)], output: [chunk("t1", 1, "one\n"), chunk("t1", 2, "two\n")] }))).toBe(true);
    expect(p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 1, state: 2 }), tasks: [task("t1", "a", TaskState.SUCCEEDED)] }))).toBe(true);
    expect(p.handle(create(WatchJobResponseSchema, { job: create(JobSchema, { id: "j1", taskCount: 1, state: 2 }), tasks: [task("t1", "a", TaskState.SUCCEEDED)], output: [chunk("t1", 2, "two\n")] }))).toBe(false);
    const events = out
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { type: string; job?: { state: string }; task?: { state: string }; seq?: number })
      .map((e) => (e.type === "job" ? `job:${e.job!.state}` : e.type === "task" ? `task:${e.task!.state}` : `output:${e.seq}`));
    expect(events).toEqual(["job:RUNNING", "task:RUNNING", "output:1", "output:2", "task:SUCCEEDED", "job:DONE"]);
  });
});

describe("a task's line", () => {
  it("shows a host's message with its control characters made harmless (a host cannot rewrite the operator's screen)", () => {
    const t = create(TaskSchema, { id: "t1", hostId: "h1", state: TaskState.FAILED, exitCode: 1, message: "exit code 1\x1b]0;owned\x07\x1b[2J", lateReport: { state: TaskState.SUCCEEDED, message: "late\x1b[31m" } });
    const line = taskLine(t);
    expect(line).not.toMatch(/[\x00-\x1f\x7f-\x9f]/);
    expect(line).toContain("exit code 1\ufffd]0;owned\ufffd\ufffd[2J");
  });
});
