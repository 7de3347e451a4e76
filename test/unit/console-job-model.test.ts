/**
 * The console's job view (console/src/job-model.ts): batches applied in
 * place, each under a new rev, with output decoded across chunk borders
 * and capped per task.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { applyBatch, emptyView, groupOutput, MAX_SHOWN_OUTPUT, type StreamDecoder } from "../../console/src/job-model.js";
import { TaskSchema, WatchJobResponseSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const task = (id: string, state: TaskState, exitCode?: number) => create(TaskSchema, { id, hostId: `h-${id}`, state, ...(exitCode === undefined ? {} : { exitCode }) });
const chunk = (taskId: string, data: Uint8Array, stream = OutputStream.STDOUT) => ({ taskId, data, stream, seq: 1n });

describe("the console's job view", () => {
  it("applies batches in place under a new rev each, keeps the latest task record, and decodes a character split across chunks", () => {
    const decoders = new Map<string, StreamDecoder>();
    const v0 = emptyView();
    const v1 = applyBatch(v0, create(WatchJobResponseSchema, { tasks: [task("t1", TaskState.RUNNING), task("t2", TaskState.RUNNING)] }), decoders);
    expect(v1).not.toBe(v0);
    expect(v1.rev).toBe(1);
    expect(v1.tasks).toBe(v0.tasks); // the same map, not a copy per batch
    const e = Buffer.from("é");
    const v2 = applyBatch(v1, create(WatchJobResponseSchema, { tasks: [task("t1", TaskState.SUCCEEDED, 0)], output: [chunk("t1", e.subarray(0, 1)), chunk("t2", Buffer.from("oops"), OutputStream.STDERR)] }), decoders);
    const v3 = applyBatch(v2, create(WatchJobResponseSchema, { output: [chunk("t1", Buffer.concat([e.subarray(1), Buffer.from("!\n")]))] }), decoders);
    expect(v3.rev).toBe(3);
    expect(v3.tasks.get("t1")!.state).toBe(TaskState.SUCCEEDED);
    expect(v3.tasks.size).toBe(2);
    expect(v3.output.get("t1")).toEqual({ out: "é!\n", err: "" });
    expect(v3.output.get("t2")).toEqual({ out: "", err: "oops" });
    const groups = groupOutput(v3, [...v3.tasks.values()]);
    expect(groups.map((g) => g.hosts)).toEqual([["h-t1"], ["h-t2"]]);
  });

  it("keeps at most MAX_SHOWN_OUTPUT characters of a task's stream", () => {
    const decoders = new Map<string, StreamDecoder>();
    let v = emptyView();
    const piece = Buffer.alloc(100 * 1024, "a");
    for (let i = 0; i < 4; i++) v = applyBatch(v, create(WatchJobResponseSchema, { output: [chunk("t1", piece)] }), decoders);
    expect(v.output.get("t1")!.out.length).toBe(MAX_SHOWN_OUTPUT);
  });
});
