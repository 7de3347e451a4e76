import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { silentLogger } from "../../common/logger.js";
import { screenControllerFrame, screenProxyFrame } from "../../common/link-limits.js";
import { ackRunsOf, acksOfRuns, isPlainStatus, StatusRunBuilder, statusesOfRuns } from "../../common/status-runs.js";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { TaskState, TaskStatusSchema, type TaskStatus } from "../../gen/rexmesh/v1/task_pb.js";

/** Seeded floats in [0, 1) (chaos/prng.ts), so a failure names its seed. */
function rng(seed: number): () => number {
  const prng = new Prng(seed);
  return () => prng.next();
}

const STATES = [TaskState.QUEUED, TaskState.DISPATCHED, TaskState.DELIVERED, TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.EXPIRED];

/** A random status: plain (no signature, output count or digest) most of the time. */
function randomStatus(r: () => number, tasks: number, i: number): TaskStatus {
  const task = Math.floor(r() * tasks);
  const plain = r() < 0.8;
  return create(TaskStatusSchema, {
    taskId: `t${task}`,
    hostId: `h${task % 7}`,
    state: STATES[Math.floor(r() * STATES.length)]!,
    atProxy: r() < 0.4,
    exitCode: r() < 0.3 ? Math.floor(r() * 3) : undefined,
    message: r() < 0.2 ? "pong" : "",
    time: timestampFromMs(1_000_000 + i),
    ...(plain ? {} : { signature: new Uint8Array([1, 2, 3]), keyId: "k1", outputChunks: BigInt(1 + Math.floor(r() * 4)) }),
  });
}

/** What a receiver applies: the runs in order, then the whole statuses, as the fields that matter. */
function applied(b: StatusRunBuilder): TaskStatus[] {
  return [...statusesOfRuns(b.runs), ...b.statuses];
}

const key = (s: TaskStatus) => `${s.taskId}|${s.hostId}|${s.state}|${s.atProxy}|${s.exitCode ?? ""}|${s.signal}|${s.message}|${s.signature.length}|${s.outputChunks}`;

describe("status runs", () => {
  it("stand for exactly the statuses added, each task's in the order they were added (seeded)", () => {
    for (let seed = 1; seed <= 200; seed++) {
      const r = rng(seed);
      const input = Array.from({ length: 1 + Math.floor(r() * 300) }, (_, i) => randomStatus(r, 1 + Math.floor(r() * 40), i));
      const b = new StatusRunBuilder();
      for (const s of input) b.add(s);
      const out = applied(b);
      // The same statuses, nothing lost or made up...
      expect(out.map(key).sort(), `seed ${seed}`).toEqual(input.map(key).sort());
      // ...and per task in the same order.
      const perTask = (list: TaskStatus[]) => {
        const m = new Map<string, string[]>();
        for (const s of list) m.set(s.taskId, [...(m.get(s.taskId) ?? []), key(s)]);
        return m;
      };
      expect(perTask(out), `seed ${seed}`).toEqual(perTask(input));
      // A whole status never goes into a run.
      for (const run of b.runs) expect(run.taskIds.length).toBe(run.hostIds.length);
      expect(b.statuses.filter((s) => !isPlainStatus(s)).length).toBe(input.filter((s) => !isPlainStatus(s)).length);
    }
  });

  it("gather a fleet's statuses of one kind into one run, with the earliest time", () => {
    const b = new StatusRunBuilder();
    for (let i = 0; i < 1000; i++) b.add(create(TaskStatusSchema, { taskId: `t${i}`, hostId: `h${i}`, state: TaskState.QUEUED, atProxy: true, time: timestampFromMs(5000 - i) }));
    for (let i = 0; i < 1000; i++) b.add(create(TaskStatusSchema, { taskId: `t${i}`, hostId: `h${i}`, state: TaskState.SUCCEEDED, exitCode: 0, message: "pong", time: timestampFromMs(9000) }));
    expect(b.runs.map((r) => [TaskState[r.state], r.taskIds.length])).toEqual([
      ["QUEUED", 1000],
      ["SUCCEEDED", 1000],
    ]);
    expect(Number(b.runs[0]!.time!.seconds) * 1000 + b.runs[0]!.time!.nanos / 1e6).toBe(4001);
    expect(b.statuses).toEqual([]);
    // On the wire a run is under half the statuses it stands for (ids dominate both).
    const asRuns = create(ProxyStreamRequestSchema, { statusRuns: b.runs });
    const whole = create(ProxyStreamRequestSchema, { statuses: applied(b) });
    expect(toBinary(ProxyStreamRequestSchema, asRuns).length * 2).toBeLessThan(toBinary(ProxyStreamRequestSchema, whole).length);
  });

  it("keep a task's later status after its earlier one even when that one's kind already has an earlier run", () => {
    const b = new StatusRunBuilder();
    const s = (taskId: string, state: TaskState, atProxy = false) => create(TaskStatusSchema, { taskId, hostId: "h1", state, atProxy });
    b.add(s("a", TaskState.EXPIRED, true));
    b.add(s("b", TaskState.RUNNING));
    b.add(s("b", TaskState.EXPIRED, true));
    b.add(s("a", TaskState.RUNNING));
    // a: EXPIRED(own copy) then RUNNING (the host brought it from elsewhere): reversed, the proxy would stay a holder.
    expect(applied(b).filter((x) => x.taskId === "a").map((x) => TaskState[x.state])).toEqual(["EXPIRED", "RUNNING"]);
    expect(applied(b).filter((x) => x.taskId === "b").map((x) => TaskState[x.state])).toEqual(["RUNNING", "EXPIRED"]);
  });

  it("acknowledgements in runs stand for the same acknowledgements, in each task's order", () => {
    const acks = [
      { taskId: "a", state: TaskState.QUEUED, atProxy: true },
      { taskId: "b", state: TaskState.QUEUED, atProxy: true },
      { taskId: "a", state: TaskState.SUCCEEDED, atProxy: false },
      { taskId: "c", state: TaskState.QUEUED, atProxy: true },
      { taskId: "a", state: TaskState.QUEUED, atProxy: true },
    ];
    const runs = ackRunsOf(acks);
    expect(runs.map((r) => r.taskIds)).toEqual([["a", "b", "c"], ["a"], ["a"]]);
    expect(acksOfRuns(runs).map((a) => `${a.taskId}:${TaskState[a.state]}:${a.atProxy}`).sort()).toEqual(acks.map((a) => `${a.taskId}:${TaskState[a.state]}:${a.atProxy}`).sort());
  });

  it("a controller screening a proxy's frame refuses a run whose lists differ in length, and checks every id a run names", () => {
    const frame = create(ProxyStreamRequestSchema, {
      statusRuns: [
        { state: TaskState.QUEUED, atProxy: true, taskIds: ["t1", "t2"], hostIds: ["h1"] },
        { state: TaskState.QUEUED, atProxy: true, taskIds: ["t3", "x".repeat(1000), ""], hostIds: ["h3", "h4", "h5"] },
        { state: 999 as TaskState, taskIds: ["t6"], hostIds: ["h6"] },
      ],
      statuses: [create(TaskStatusSchema, { taskId: "t9", hostId: "h9", state: TaskState.RUNNING })],
    });
    const refused = screenProxyFrame(frame);
    expect(frame.statusRuns).toEqual([]);
    expect(frame.statuses.map((s) => `${s.taskId}:${s.hostId}:${TaskState[s.state]}:${s.atProxy}`)).toEqual(["t3:h3:QUEUED:true", "t9:h9:RUNNING:false"]);
    expect(refused.count).toBe(4);
    expect(refused.firstReason).toMatch(/names 2 tasks but 1 hosts/);
    refused.warn(silentLogger, "x");
  });

  it("a proxy screening a controller's frame takes acknowledgement runs as acknowledgements, ahead of the others", () => {
    const frame = create(ProxyStreamResponseSchema, {
      statusAckRuns: [{ state: TaskState.QUEUED, atProxy: true, taskIds: ["t1", "", "t2"] }],
      statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }],
    });
    const refused = screenControllerFrame(frame);
    expect(frame.statusAcks.map((a) => `${a.taskId}:${TaskState[a.state]}:${a.atProxy}`)).toEqual(["t1:QUEUED:true", "t2:QUEUED:true", "t1:SUCCEEDED:false"]);
    expect(refused.count).toBe(1);
  });
});
