/**
 * `rexmesh run` follows its job with WatchJob and starts the watch again
 * when the controller goes away; a watch broken by the connection itself
 * (a raw ECONNRESET that connect-es passed on as it was, seen once when a
 * controller restarted mid-run) must be started again too, while any other
 * error ends the run at once.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { watch, type Io } from "../../cli/operator.js";
import { JobState, WatchJobResponseSchema, type WatchJobResponse } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const batch = (state: TaskState, jobState = JobState.RUNNING) =>
  create(WatchJobResponseSchema, { job: { id: "j1", state: jobState }, tasks: [{ id: "t1", jobId: "j1", hostId: "h1", state }] });

/** A client whose watches play `plays` in turn: each yields its batches, then ends or throws. */
function clientOf(plays: { batches: WatchJobResponse[]; then?: unknown }[]) {
  let call = 0;
  return {
    calls: () => call,
    client: {
      watchJob: () =>
        (async function* () {
          const play = plays[Math.min(call++, plays.length - 1)]!;
          for (const b of play.batches) yield b;
          if (play.then !== undefined) throw play.then;
        })(),
    } as unknown as Parameters<typeof watch>[0],
  };
}

const ioOf = () => {
  const out: string[] = [];
  const err: string[] = [];
  const io: Io = { out: (s) => out.push(s), err: (s) => err.push(s), isTTY: false, signal: new AbortController().signal };
  return { io, out, err };
};

const reset = () => Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET", errno: -104, syscall: "read" });

describe("a run's watch, broken under it", () => {
  it("is started again after a raw socket reset, and the run ends as its job did", async () => {
    const { client, calls } = clientOf([{ batches: [batch(TaskState.RUNNING)], then: reset() }, { batches: [batch(TaskState.SUCCEEDED, JobState.DONE)] }]);
    const { io, err } = ioOf();
    expect(await watch(client, "j1", true, io)).toBe(0);
    expect(calls()).toBe(2);
    expect(err.join("")).toMatch(/^rexmesh: lost the watch of job j1 \(Unavailable: ECONNRESET: read ECONNRESET\); the job goes on at the controller, watching again\.\.\.\n$/);
  });

  it("is not started again after an error that is not the connection's", async () => {
    const bug = new TypeError("cannot read properties of undefined");
    const { client, calls } = clientOf([{ batches: [batch(TaskState.RUNNING)], then: bug }]);
    await expect(watch(client, "j1", true, ioOf().io)).rejects.toBe(bug);
    expect(calls()).toBe(1);
  });
});
