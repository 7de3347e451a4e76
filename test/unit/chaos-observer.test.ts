import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Observer } from "../../chaos/observer.js";
import type { JobPlan } from "../../chaos/plan.js";
import { ManualClock } from "../../common/clock.js";
import { JobSchema, TaskSchema, type ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const plan: JobPlan = { index: 1, at: 0, purpose: "victim", hosts: ["a1"], params: { lines: 3, sleepMs: 100, errEvery: 0, pad: 0, burst: 0, exitCode: 0 } };

describe("chaos observer", () => {
  it("looks at a job with GetJob while the controller refuses its watch (too many open), so an end is seen within moments", async () => {
    const clock = new ManualClock();
    const t0 = clock.now();
    // The controller's state of the one task: RUNNING, then CANCELLED at +5 s.
    let state = TaskState.RUNNING;
    let watchCalls = 0;
    const client = {
      submitJob: () => Promise.resolve({ job: create(JobSchema, { id: "j1" }) }),
      // Every watch is refused, as the 17th of one operator's is (watchesPerOperator = 16).
      watchJob: async function* () {
        watchCalls++;
        throw new ConnectError("too many WatchJob streams for one operator at once (at most 16)", Code.ResourceExhausted);
      },
      getJob: () => Promise.resolve({ job: create(JobSchema, { id: "j1" }), tasks: [create(TaskSchema, { id: "t1", jobId: "j1", hostId: "a1", state, proxy: "proxy-alpha-1" })] }),
    } as unknown as Client<typeof ControllerService>;
    const o = new Observer(client, clock, t0, { runId: "r", marksDir: "/nonexistent", lostAfterMs: 20_000, retryForMs: 5_000 });
    const turn = () => new Promise((resolve) => setImmediate(resolve));
    const pass = async (ms: number) => {
      for (let left = ms; left > 0; left -= 100) {
        clock.advance(100);
        await turn();
      }
    };

    await o.submit(plan, 1);
    await pass(5000);
    state = TaskState.CANCELLED;
    await pass(2500);

    const task = o.tasks.get("t1");
    expect(task?.terminal?.state).toBe(TaskState.CANCELLED);
    expect(task!.terminal!.via).toBe("get");
    expect(task!.terminal!.at).toBeLessThanOrEqual(5000 + 1500);
    // The watch is still tried (it takes over once a slot is free), and the looks stop once every task ended.
    expect(watchCalls).toBeGreaterThan(1);
    const calls = watchCalls;
    await pass(5000);
    expect(watchCalls).toBe(calls);
    await o.stop();
  });
});
