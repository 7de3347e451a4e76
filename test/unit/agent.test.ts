import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LIMITS } from "../../common/limits.js";
import { silentLogger } from "../../common/logger.js";
import { Agent, LINK_BACKLOG_HIGH_FRAMES, LINK_BACKLOG_LOW_FRAMES, type AgentUpdates } from "../../daemon/agent.js";
import type { Executor, RunIo, TaskOutcome } from "../../daemon/executor.js";
import { MemoryLedger, type LedgerEntry } from "../../daemon/ledger.js";
import { AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";
import { HostEventSchema } from "../../gen/rexmesh/v1/event_pb.js";
import { OutputStream, StepSchema, TaskState, type SignedTask, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { FakeLink, asSigned, expectResolvesAfter, flush, taskSpec, testVerifier, text } from "./support.js";

type AgentSide = FakeLink<AgentStreamRequest, AgentStreamResponse>;

interface FakeRun {
  spec: TaskSpec;
  io: RunIo;
  finish(outcome?: Partial<TaskOutcome>): void;
}

/** Stands in for the process executor: records each run and lets the test end it. */
class FakeExecutor {
  readonly runs: FakeRun[] = [];
  onRun: ((spec: TaskSpec) => void) | undefined;

  run(spec: TaskSpec, io: RunIo): Promise<TaskOutcome> {
    this.onRun?.(spec);
    return new Promise((resolve) => {
      this.runs.push({
        spec,
        io,
        finish: (o = {}) => resolve({ state: TaskState.SUCCEEDED, message: "", outputChunks: 0, outputTruncated: false, ...o }),
      });
    });
  }
}

/** A ledger that also records the state of every entry at the moment it is written. */
class RecordingLedger extends MemoryLedger {
  constructor(readonly events: string[] = []) {
    super();
  }
  override async put(entry: LedgerEntry): Promise<void> {
    this.events.push(`put:${entry.spec.taskId}:${TaskState[entry.state]}`);
    await super.put(entry);
  }
}

const statusesIn = (frames: AgentStreamRequest[]) => frames.flatMap((f) => f.statuses.map((s) => `${s.taskId}:${TaskState[s.state]}`));
const outputIn = (frames: AgentStreamRequest[]) => frames.flatMap((f) => f.output.map((c) => `${c.taskId}:${c.seq}:${text(c.data)}`));

function setup(opts: { capacity?: number; ledger?: MemoryLedger; clock?: ManualClock; maxUnackedOutputBytes?: number; tools?: string[]; updates?: AgentUpdates; onRestart?: (reason: string) => void } = {}) {
  const clock = opts.clock ?? new ManualClock();
  const ledger = opts.ledger ?? new RecordingLedger();
  const executor = new FakeExecutor();
  const links: AgentSide[] = [];
  const dialed: string[] = [];
  const agent = new Agent({
    hostId: "h1",
    tenant: "acme",
    proxies: ["px-a:7444"],
    dial: async (address) => {
      dialed.push(address);
      const link: AgentSide = new FakeLink();
      links.push(link);
      return link;
    },
    executor: executor as unknown as Executor,
    ledger,
    verifier: testVerifier(clock),
    facts: create(HostFactsSchema, { hostname: "h1.example", os: "linux" }),
    clock,
    log: silentLogger,
    capacity: opts.capacity ?? 2,
    maxUnackedOutputBytes: opts.maxUnackedOutputBytes,
    tools: opts.tools,
    updates: opts.updates,
    onRestart: opts.onRestart,
  });
  const link = () => links.at(-1)!;
  /** A frame from the proxy on the current link. */
  const fromProxy = (init: Omit<MessageInitShape<typeof AgentStreamResponseSchema>, "tasks" | "$typeName"> & { tasks?: (TaskSpec | SignedTask)[] }) =>
    link().deliver(create(AgentStreamResponseSchema, { ...init, tasks: (init.tasks ?? []).map(asSigned) }));
  /** The proxy drops the stream; the agent backs off (≤ 1.2 s on the first retry) and dials again; the proxy welcomes it. */
  const reconnect = async () => {
    const before = links.length;
    link().end();
    await flush();
    clock.advance(5000);
    await flush();
    expect(links.length).toBe(before + 1);
    fromProxy({ welcome: { proxy: "px-a", region: "eu", heartbeatMs: 10_000 } });
    await flush();
  };
  const spec = (id: string, more: Parameters<typeof taskSpec>[2] = {}) => taskSpec(id, "h1", { deliverByMs: clock.now() + 3_600_000, ...more });
  /** Starts the agent and lets the proxy welcome it. */
  const start = async () => {
    await agent.start();
    await flush();
    fromProxy({ welcome: { proxy: "px-a", region: "eu", heartbeatMs: 10_000 } });
    await flush();
  };
  /** Starts the agent and has the proxy send it task `id`; resolves to the task's run. */
  const running = async (id = "t1") => {
    await start();
    fromProxy({ tasks: [spec(id)] });
    await flush();
    return executor.runs.at(-1)!;
  };
  return { clock, ledger, executor, links, dialed, agent, link, fromProxy, reconnect, spec, start, running };
}

describe("Agent: connecting", () => {
  it("says hello with its host id, facts and credits equal to its capacity", async () => {
    const t = setup({ capacity: 3 });
    await t.agent.start();
    await flush();
    expect(t.dialed).toEqual(["px-a:7444"]);
    const hello = t.link().sent[0]!;
    expect(hello.hello?.hostId).toBe("h1");
    expect(hello.hello?.facts?.hostname).toBe("h1.example");
    expect(hello.credits).toBe(3);
    expect(t.agent.connected).toBe(true);
  });

  it("tells listeners which proxy welcomed it", async () => {
    const t = setup();
    const seen: string[] = [];
    t.agent.onConnected((p) => seen.push(p));
    await t.start();
    expect(seen).toEqual(["px-a"]);
  });

  it("dials again after the stream ends and stops cleanly", async () => {
    const t = setup();
    await t.start();
    await t.reconnect();
    expect(t.dialed).toEqual(["px-a:7444", "px-a:7444"]);
    await t.agent.stop();
    expect(t.agent.connected).toBe(false);
    expect(t.link().isClosed).toBe(true);
  });
});

describe("Agent: accepting and running tasks", () => {
  it("writes a task to its ledger as DELIVERED, then RUNNING, before the executor is called", async () => {
    const t = setup();
    const ledger = t.ledger as RecordingLedger;
    // Recorded rather than asserted here: the agent swallows (logs) what the executor throws.
    t.executor.onRun = (spec) => ledger.events.push(`run:${spec.taskId}:ledger=${TaskState[ledger.get(spec.taskId)!.state]}`);
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    expect(ledger.events).toEqual(["put:t1:DELIVERED", "put:t1:RUNNING", "run:t1:ledger=RUNNING"]);
    expect(statusesIn(t.link().sent)).toEqual(["t1:DELIVERED", "t1:RUNNING"]);
    const run = t.executor.runs[0]!;
    expect(run.spec.env).toMatchObject({ REXMESH_HOST_ID: "h1", REXMESH_TASK_ID: "t1", REXMESH_JOB_ID: "j1" });
  });

  it("reports its final status with exit code and chunk count and records it in the ledger", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    t.executor.runs[0]!.finish({ state: TaskState.FAILED, exitCode: 3, message: "exit code 3" });
    await flush();
    const final = t.link().sent.flatMap((f) => f.statuses).find((s) => s.state === TaskState.FAILED)!;
    expect(final.exitCode).toBe(3);
    expect(final.hostId).toBe("h1");
    expect(final.message).toBe("exit code 3");
    expect(t.ledger.get("t1")?.final?.state).toBe(TaskState.FAILED);
    expect(t.ledger.unfinished()).toEqual([]);
  });

  it("runs a task delivered twice only once and answers the second delivery from the ledger", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1"), t.spec("t1")] });
    await flush();
    expect(t.executor.runs).toHaveLength(1);
    let before = t.link().sent.length;
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    expect(t.executor.runs).toHaveLength(1);
    expect(statusesIn(t.link().sent.slice(before))).toEqual(["t1:RUNNING"]);

    t.executor.runs[0]!.finish({ exitCode: 0 });
    await flush();
    before = t.link().sent.length;
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    expect(t.executor.runs).toHaveLength(1);
    expect(statusesIn(t.link().sent.slice(before))).toEqual(["t1:SUCCEEDED"]);
  });

  it("rejects a task addressed to another host or tenant without running it", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [taskSpec("t1", "h2", { deliverByMs: t.clock.now() + 60_000 }), t.spec("t2", { tenant: "other" })] });
    await flush();
    expect(statusesIn(t.link().sent)).toEqual(["t1:REJECTED", "t2:REJECTED"]);
    expect(t.executor.runs).toHaveLength(0);
    expect(t.ledger.get("t1")?.state).toBe(TaskState.REJECTED);
  });

  it("rejects a task with a step whose tool the host does not have, naming step, tool and the host's tools", async () => {
    const t = setup({ tools: ["exec", "shell", "python"] });
    await t.start();
    const ansible = create(StepSchema, { name: "deploy", tool: { case: "ansible", value: { module: "ping" } } });
    const python = create(StepSchema, { tool: { case: "python", value: { script: "print(1)" } } });
    t.fromProxy({ tasks: [t.spec("t1", { steps: [python, ansible] }), t.spec("t2", { steps: [python] })] });
    await flush();
    expect(statusesIn(t.link().sent)).toEqual(["t1:REJECTED", "t2:DELIVERED", "t2:RUNNING"]);
    const rejected = t.link().sent.flatMap((f) => f.statuses).find((s) => s.taskId === "t1")!;
    expect(rejected.message).toBe("step 2 (deploy) needs the ansible tool, which this host does not have (its tools: exec, shell, python)");
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["t2"]);
  });

  it("expires a task that arrives after its delivery deadline without running it", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1", { deliverByMs: t.clock.now() })] });
    await flush();
    expect(statusesIn(t.link().sent)).toEqual(["t1:EXPIRED"]);
    expect(t.executor.runs).toHaveLength(0);
  });

  it("runs at most capacity tasks at once and reports its credits as they change", async () => {
    const t = setup({ capacity: 2 });
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1"), t.spec("t2"), t.spec("t3")] });
    await flush();
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["t1", "t2"]);
    const credits = () => t.link().sent.filter((f) => f.credits !== undefined).map((f) => f.credits);
    expect(credits().at(-1)).toBe(0);
    t.executor.runs[0]!.finish();
    await flush();
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["t1", "t2", "t3"]);
    t.executor.runs[1]!.finish();
    t.executor.runs[2]!.finish();
    await flush();
    expect(credits().at(-1)).toBe(2);
  });

  it("aborts the executor's signal when a running task is cancelled", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    const run = t.executor.runs[0]!;
    expect(run.io.signal?.aborted).toBe(false);
    t.fromProxy({ cancelTaskIds: ["t1"] });
    await flush();
    expect(run.io.signal?.aborted).toBe(true);
    run.finish({ state: TaskState.CANCELLED, message: "cancelled" });
    await flush();
    expect(statusesIn(t.link().sent)).toEqual(["t1:DELIVERED", "t1:RUNNING", "t1:CANCELLED"]);
  });

  it("cancels a task still waiting for a slot without ever running it", async () => {
    const t = setup({ capacity: 1 });
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1"), t.spec("t2")] });
    await flush();
    t.fromProxy({ cancelTaskIds: ["t2"] });
    await flush();
    expect(statusesIn(t.link().sent)).toContain("t2:CANCELLED");
    t.executor.runs[0]!.finish();
    await flush();
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["t1"]);
    expect(t.ledger.get("t2")?.final?.state).toBe(TaskState.CANCELLED);
  });
});

describe("Agent: results until acknowledged", () => {
  it("keeps output and statuses until acked and sends what is not acked again after a reconnect", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    const run = t.executor.runs[0]!;
    run.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("hello "), 1);
    run.io.onOutput(OutputStream.STDERR, new TextEncoder().encode("world"), 2);
    run.finish({ outputChunks: 2, exitCode: 0 });
    await flush();
    expect(outputIn(t.link().sent)).toEqual(["t1:1:hello ", "t1:2:world"]);
    expect(statusesIn(t.link().sent)).toEqual(["t1:DELIVERED", "t1:RUNNING", "t1:SUCCEEDED"]);

    // The proxy acks part: chunk 1 and the statuses up to RUNNING.
    t.fromProxy({ outputAcks: [{ taskId: "t1", seq: 1n }], statusAcks: [{ taskId: "t1", state: TaskState.RUNNING }] });
    await flush();
    await t.reconnect();
    const again = t.link().sent;
    expect(again[0]?.hello?.hostId).toBe("h1");
    expect(outputIn(again)).toEqual(["t1:2:world"]);
    expect(statusesIn(again)).toEqual(["t1:SUCCEEDED"]);

    // Everything acked: nothing goes again.
    t.fromProxy({ outputAcks: [{ taskId: "t1", seq: 2n }], statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }] });
    await flush();
    await t.reconnect();
    expect(outputIn(t.link().sent)).toEqual([]);
    expect(statusesIn(t.link().sent)).toEqual([]);
  });

  it("ignores an ack of a state no version defines: the task's end is still unreported and its results are sent again", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    const run = t.executor.runs[0]!;
    run.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("hello"), 1);
    run.finish({ outputChunks: 1, exitCode: 0 });
    await flush();
    // 2^20 is above every terminal state: taken at its word, it marked the end reported and dropped every status.
    t.fromProxy({ statusAcks: [{ taskId: "t1", state: 2 ** 20 }] });
    await flush();
    expect(t.ledger.unreported().map((e) => e.spec.taskId)).toEqual(["t1"]);
    await t.reconnect();
    expect(outputIn(t.link().sent)).toEqual(["t1:1:hello"]);
    expect(statusesIn(t.link().sent)).toEqual(["t1:DELIVERED", "t1:RUNNING", "t1:SUCCEEDED"]);
  });

  it("keeps output data as the executor hands it over, without a copy (the executor never writes to it again)", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    const buf = new TextEncoder().encode("abc");
    t.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, buf, 1);
    await flush();
    expect(outputIn(t.link().sent)).toEqual(["t1:1:abc"]);
    const sent = t.link().sent.flatMap((f) => f.output);
    expect(sent[0]!.data).toBe(buf);
  });

  it("keeps producing results while disconnected and sends them on the next stream", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    t.link().end();
    await flush();
    expect(t.agent.connected).toBe(false);
    const run = t.executor.runs[0]!;
    run.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("x"), 1);
    run.finish({ outputChunks: 1 });
    await flush();
    t.clock.advance(5000);
    await flush();
    expect(t.links).toHaveLength(2);
    // What is not acknowledged follows the proxy's welcome.
    expect(outputIn(t.link().sent)).toEqual([]);
    t.fromProxy({ welcome: { proxy: "px-a", region: "eu", heartbeatMs: 10_000 } });
    await flush();
    expect(outputIn(t.link().sent)).toEqual(["t1:1:x"]);
    expect(statusesIn(t.link().sent)).toEqual(["t1:DELIVERED", "t1:RUNNING", "t1:SUCCEEDED"]);
  });
});

describe("Agent: recovery after a restart", () => {
  it("reports a task left RUNNING as INTERRUPTED without running it; runs accepted and idempotent ones", async () => {
    const clock = new ManualClock();
    const ledger = new MemoryLedger();
    const deliverByMs = clock.now() + 3_600_000;
    await ledger.put({ spec: taskSpec("t1", "h1", { deliverByMs }), state: TaskState.RUNNING });
    await ledger.put({ spec: taskSpec("t2", "h1", { deliverByMs, idempotent: true }), state: TaskState.RUNNING });
    await ledger.put({ spec: taskSpec("t3", "h1", { deliverByMs }), state: TaskState.DELIVERED });
    const t = setup({ ledger, clock });
    await t.agent.start();
    await flush();
    const hello = t.link().sent[0]!;
    expect(hello.credits).toBe(0); // t2 and t3 are waiting
    expect(ledger.get("t1")?.final?.state).toBe(TaskState.INTERRUPTED);
    expect(t.executor.runs).toHaveLength(0);
    t.fromProxy({ welcome: { proxy: "px-a", region: "eu", heartbeatMs: 10_000 } });
    await flush();
    expect(statusesIn(t.link().sent)).toContain("t1:INTERRUPTED");
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["t2", "t3"]);
  });

  // Regression guard (was a bug at daemon/agent.ts:60 and :136-144, now fixed): the outbox of unacknowledged results is in memory
  // only, and recover() looks only at ledger entries without a final status. A task that
  // finished (final status written to the ledger) but whose final status the proxy had not
  // acknowledged when the daemon stopped is never reported again: the proxy holds the task as
  // RUNNING (it only re-sends DISPATCHED tasks, which the ledger would answer), so the task
  // never reaches its terminal state at the controller and its job never finishes.
  it("sends a final status that was never acknowledged again after a restart", async () => {
    const clock = new ManualClock();
    const ledger = new MemoryLedger();
    const first = setup({ ledger, clock });
    await first.start();
    first.fromProxy({ tasks: [first.spec("t1")] });
    await flush();
    first.fromProxy({ statusAcks: [{ taskId: "t1", state: TaskState.RUNNING }] });
    first.executor.runs[0]!.finish({ exitCode: 0 });
    await flush();
    expect(ledger.get("t1")?.final?.state).toBe(TaskState.SUCCEEDED);
    // The daemon stops before the proxy acknowledged SUCCEEDED; a new process starts on the same ledger.
    const second = setup({ ledger, clock });
    await second.start();
    expect(statusesIn(second.link().sent)).toContain("t1:SUCCEEDED");
  });
});

describe("Agent: back-pressure on output", () => {
  // Outbox sizes as Backlog counts them: a status 64 bytes, a chunk its data + 32.
  const bytes300 = new Uint8Array(300);

  /** Starts t1 and returns its run and a counter of the resumes the agent announced. */
  async function running(t: ReturnType<typeof setup>) {
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1")] });
    await flush();
    const run = t.executor.runs[0]!;
    const flow = run.io.flow!;
    const seen = { resumes: 0 };
    flow.onResume(() => seen.resumes++);
    return { run, flow, seen };
  }

  it("pauses the executor's output once unacknowledged results pass the mark and resumes when acks bring them to half", async () => {
    const t = setup({ maxUnackedOutputBytes: 1000 });
    const { run, flow, seen } = await running(t);
    expect(flow.paused()).toBe(false);

    // DELIVERED + RUNNING (128) + two chunks (664) = 792: under the mark.
    run.io.onOutput(OutputStream.STDOUT, bytes300, 1);
    run.io.onOutput(OutputStream.STDOUT, bytes300, 2);
    expect(flow.paused()).toBe(false);
    // A third: 1124 > 1000.
    run.io.onOutput(OutputStream.STDOUT, bytes300, 3);
    expect(flow.paused()).toBe(true);
    expect(t.agent.outputPaused).toBe(true);
    await flush();
    // Paused is not dropped: what was produced goes out.
    expect(t.link().sent.flatMap((f) => f.output).map((c) => Number(c.seq))).toEqual([1, 2, 3]);

    // Ack of chunk 1: 792, still above the low-water mark of 500.
    t.fromProxy({ outputAcks: [{ taskId: "t1", seq: 1n }] });
    await flush();
    expect(flow.paused()).toBe(true);
    expect(seen.resumes).toBe(0);

    // Acks of the statuses and chunk 2: 332 ≤ 500, output flows again.
    t.fromProxy({ outputAcks: [{ taskId: "t1", seq: 2n }], statusAcks: [{ taskId: "t1", state: TaskState.RUNNING }] });
    await flush();
    expect(flow.paused()).toBe(false);
    expect(t.agent.outputPaused).toBe(false);
    expect(seen.resumes).toBe(1);
    run.finish({ outputChunks: 3 });
    await flush();
  });

  it("pauses while no proxy is connected and resumes on the acks of the next stream", async () => {
    const t = setup({ maxUnackedOutputBytes: 1000 });
    const { run, flow, seen } = await running(t);
    t.link().end();
    await flush();
    expect(t.agent.connected).toBe(false);
    for (let seq = 1; seq <= 3; seq++) run.io.onOutput(OutputStream.STDOUT, bytes300, seq);
    expect(flow.paused()).toBe(true);

    t.clock.advance(5000); // dials again and, once welcomed, sends everything not acknowledged
    await flush();
    expect(t.links).toHaveLength(2);
    expect(flow.paused()).toBe(true);
    t.fromProxy({ welcome: { proxy: "px-a", region: "eu", heartbeatMs: 10_000 } });
    await flush();
    expect(t.link().sent.flatMap((f) => f.output).map((c) => Number(c.seq))).toEqual([1, 2, 3]);
    t.fromProxy({ outputAcks: [{ taskId: "t1", seq: 3n }], statusAcks: [{ taskId: "t1", state: TaskState.RUNNING }] });
    await flush();
    expect(flow.paused()).toBe(false);
    expect(seen.resumes).toBe(1);
    run.finish({ outputChunks: 3 });
    await flush();
  });

  it("pauses while the link has more unwritten frames than it should and resumes as they drain", async () => {
    const t = setup();
    const { run, flow, seen } = await running(t);
    const link = t.link() as { backlog: number };
    link.backlog = LINK_BACKLOG_HIGH_FRAMES + 1; // the stream is not taking frames
    run.io.onOutput(OutputStream.STDOUT, bytes300, 1);
    await flush(); // the frame with the chunk is sent: the agent looks at the link
    expect(flow.paused()).toBe(true);

    link.backlog = LINK_BACKLOG_LOW_FRAMES + 1;
    t.clock.advance(1000);
    expect(flow.paused()).toBe(true);
    // Frames drain without an event: the agent looks again while paused.
    link.backlog = LINK_BACKLOG_LOW_FRAMES;
    t.clock.advance(1000);
    expect(flow.paused()).toBe(false);
    expect(seen.resumes).toBe(1);
    run.finish({ outputChunks: 1 });
    await flush();
  });

  it("uses 16 MiB by default and refuses a negative mark", async () => {
    const t = setup();
    const { run, flow } = await running(t);
    const mib = new Uint8Array(1024 * 1024);
    for (let seq = 1; seq <= 15; seq++) run.io.onOutput(OutputStream.STDOUT, mib, seq);
    expect(flow.paused()).toBe(false);
    run.io.onOutput(OutputStream.STDOUT, mib, 16);
    expect(flow.paused()).toBe(true);
    run.finish({ outputChunks: 16 });
    await flush();
    expect(() => setup({ maxUnackedOutputBytes: -1 })).toThrow(/maxUnackedOutputBytes/);
  });
});

describe("Agent: ping", () => {
  it("answers a ping task at once: SUCCEEDED, no process, no ledger entry", async () => {
    const t = setup();
    await t.start();
    const ping = taskSpec("p1", "h1", { deliverByMs: t.clock.now() + 60_000 });
    ping.steps = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    t.fromProxy({ tasks: [ping] });
    await flush();
    expect(t.executor.runs).toHaveLength(0);
    expect(t.ledger.get("p1")).toBeUndefined();
    expect(statusesIn(t.link().sent)).toContain("p1:SUCCEEDED");
  });

  it("keeps no ping answer for an ack: after a reconnect it is not sent again", async () => {
    const t = setup();
    await t.start();
    const ping = taskSpec("p1", "h1", { deliverByMs: t.clock.now() + 60_000 });
    ping.steps = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    t.fromProxy({ tasks: [ping] });
    await flush();
    expect(statusesIn(t.link().sent)).toEqual(["p1:SUCCEEDED"]);
    await t.reconnect();
    expect(statusesIn(t.link().sent)).toEqual([]);
  });
});

describe("Agent: credits", () => {
  it("reports its true credits after tasks that take no slot (pings, refusals), so the proxy never runs dry", async () => {
    const t = setup({ capacity: 2 });
    await t.start();
    const before = t.link().sent.length;
    const ping = taskSpec("p1", "h1", { deliverByMs: t.clock.now() + 60_000 });
    ping.steps = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    const elsewhere = taskSpec("x1", "h2", { deliverByMs: t.clock.now() + 60_000 });
    t.fromProxy({ tasks: [ping, elsewhere] });
    await flush();
    const credits = t.link().sent.slice(before).map((f) => f.credits).filter((c) => c !== undefined);
    expect(credits).toContain(2);
  });
});

describe("Agent: the ledger keeps no secrets and does not grow without end", () => {
  it("keeps only what identifies an ended task (no env, stdin or steps), and drops it once no proxy can hand it out again", async () => {
    const t = setup();
    await t.start();
    const deliverByMs = t.clock.now() + 60_000;
    t.fromProxy({ tasks: [t.spec("t1", { env: { DB_PASSWORD: "hunter2" }, stdin: new TextEncoder().encode("secret input"), deliverByMs })] });
    await flush();
    t.executor.runs[0]!.finish();
    await flush();
    const ended = t.ledger.get("t1")!;
    expect(ended.state).toBe(TaskState.SUCCEEDED);
    expect(ended.spec.env).toEqual({});
    expect(ended.spec.stdin.length).toBe(0);
    expect(ended.spec.steps).toEqual([]);
    // A duplicate delivery is still answered from the ledger, never run again.
    t.fromProxy({ tasks: [t.spec("t1", { deliverByMs })], statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }] });
    await flush();
    expect(t.executor.runs).toHaveLength(1);
    // Acknowledged, and past the deadline plus the margin (1 h): no proxy hands it out any more.
    t.clock.advance(60_000 + 3_600_000);
    expect(await t.agent.pruneLedger()).toBe(1);
    expect(t.ledger.get("t1")).toBeUndefined();
    await t.agent.stop();
  });

  it("keeps an ended task whose end the proxy has not acknowledged", async () => {
    const t = setup();
    await t.start();
    t.fromProxy({ tasks: [t.spec("t1", { deliverByMs: t.clock.now() + 1000 })] });
    await flush();
    t.executor.runs[0]!.finish();
    await flush();
    t.clock.advance(10 * 3_600_000);
    expect(await t.agent.pruneLedger()).toBe(0);
    expect(t.ledger.get("t1")?.final).toBeDefined();
    await t.agent.stop();
  });
});

describe("Agent: draining", () => {
  it("grants no credits and starts nothing new, lets the running task end on the open stream, and resolves once its results are acknowledged", async () => {
    const t = setup({ capacity: 2 });
    await t.running();
    let drained = false;
    const draining = t.agent.drain(60_000).then(() => (drained = true));
    await flush();
    const credits = () => t.link().sent.filter((f) => f.credits !== undefined).map((f) => f.credits);
    expect(credits().at(-1)).toBe(0);
    // A task the proxy sent before it heard is kept, not started: it runs after the next start.
    t.fromProxy({ tasks: [t.spec("t2")] });
    await flush();
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["t1"]);
    expect(t.ledger.get("t2")?.state).toBe(TaskState.DELIVERED);
    t.executor.runs[0]!.finish({ exitCode: 0 });
    await flush();
    expect(statusesIn(t.link().sent)).toContain("t1:SUCCEEDED");
    expect(drained).toBe(false);
    t.fromProxy({ statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }] });
    await flush();
    expect(drained).toBe(false);
    t.fromProxy({ statusAcks: [{ taskId: "t2", state: TaskState.DELIVERED }] });
    await flush();
    expect(drained).toBe(true);
    await draining;
    expect(credits().at(-1)).toBe(0);
    await t.agent.stop();
    expect(t.executor.runs).toHaveLength(1);
  });

  it("ends a task still running early enough that its process group is killed and its end acknowledged within the grace: INTERRUPTED", async () => {
    const t = setup();
    const run = await t.running();
    let drained = false;
    const draining = t.agent.drain(5000).then(() => (drained = true));
    // 5 s of grace less the kill grace (2 s) and a second for the ack.
    t.clock.advance(1999);
    await flush();
    expect(run.io.signal?.aborted).toBe(false);
    t.clock.advance(1);
    await flush();
    expect(run.io.signal?.aborted).toBe(true);
    // What the process executor answers an aborted run (daemon/executor.ts); the kill grace passes.
    t.clock.advance(2000);
    run.finish({ state: TaskState.CANCELLED, message: "cancelled" });
    await flush();
    expect(drained).toBe(false);
    const end = t.link().sent.flatMap((f) => f.statuses).find((s) => s.state >= TaskState.SUCCEEDED)!;
    expect(TaskState[end.state]).toBe("INTERRUPTED");
    expect(end.message).toBe("the daemon stopped and its grace time ran out: the task was ended (its process group killed) and is not run again");
    t.fromProxy({ statusAcks: [{ taskId: "t1", state: TaskState.INTERRUPTED }] });
    await flush();
    expect(drained).toBe(true);
    await draining;
    expect(t.ledger.get("t1")?.final?.state).toBe(TaskState.INTERRUPTED);
  });

  it("never waits past the grace, whatever the kill grace", async () => {
    const t = setup();
    const run = await t.running();
    let drained = false;
    const draining = t.agent.drain(1500).then(() => (drained = true));
    await flush();
    // Less grace than the kill grace and the ack second: the task is ended at once.
    expect(run.io.signal?.aborted).toBe(true);
    t.clock.advance(1500);
    await flush();
    expect(drained).toBe(true);
    await draining;
    run.finish({ state: TaskState.CANCELLED, message: "cancelled" });
    await flush();
  });

  it("waits for acknowledgements no longer than the grace while no proxy holds its stream", async () => {
    const t = setup();
    (await t.running()).finish();
    await flush();
    t.link().end();
    await flush();
    await expectResolvesAfter(t.clock, t.agent.drain(3000), 3000);
    await t.agent.stop();
  });
});

describe("Agent: updates handed over across a restart", () => {
  const restart = { from: "1.0.0", to: "2.0.0", keyId: "k1", digest: "sha256:" + "a".repeat(64) };
  const recorder = () => {
    const calls: string[] = [];
    let verdict: { ok: boolean; message: string } | undefined;
    let release: (() => void) | undefined;
    const updates: AgentUpdates = {
      request: (req) => calls.push(`request:${req.taskId}:${req.from}->${req.to}`),
      settle: async (taskId, u) => {
        calls.push(`settle:${taskId}:${u.from}->${u.to}`);
        if (!verdict) await new Promise<void>((r) => (release = r));
        return verdict!;
      },
      forget: (taskId) => calls.push(`forget:${taskId}`),
      abandoned: () => calls.push("abandoned"),
      unable: () => undefined,
    };
    return { calls, updates, decide: (v: { ok: boolean; message: string }) => ((verdict = v), release?.()) };
  };

  it("lets the other running tasks end, records the update in the ledger before asking for the restart, and reports no end", async () => {
    const u = recorder();
    const restarts: string[] = [];
    const t = setup({ updates: u.updates, onRestart: (why) => restarts.push(why), capacity: 3 });
    await t.start();
    t.fromProxy({ tasks: [t.spec("other"), t.spec("up")] });
    await flush();
    const [other, up] = t.executor.runs;
    up!.finish({ restart });
    await flush();
    // Still waiting for "other"; no new task is taken meanwhile.
    expect(restarts).toEqual([]);
    expect(u.calls).toEqual([]);
    t.fromProxy({ tasks: [t.spec("late")] });
    await flush();
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["other", "up"]);
    other!.finish();
    await flush();
    expect(t.ledger.get("up")?.update).toMatchObject({ from: "1.0.0", to: "2.0.0" });
    expect(t.ledger.get("up")?.state).toBe(TaskState.RUNNING);
    expect(u.calls).toEqual(["request:up:1.0.0->2.0.0"]);
    expect(restarts).toEqual(["update 1.0.0 → 2.0.0 (task up)"]);
    const ends = statusesIn(t.links.flatMap((l) => l.sent)).filter((s) => s.startsWith("up:") && !s.endsWith("RUNNING") && !s.endsWith("DELIVERED"));
    expect(ends).toEqual([]);
  });

  it("after the restart, ends the update with what the supervisor decided, then forgets the result", async () => {
    const u = recorder();
    const ledger = new RecordingLedger();
    const clock = new ManualClock();
    const first = setup({ ledger, clock, updates: u.updates, onRestart: () => undefined });
    await first.start();
    first.fromProxy({ tasks: [first.spec("up")] });
    await flush();
    first.executor.runs[0]!.finish({ restart });
    await flush();
    expect(ledger.get("up")?.update?.to).toBe("2.0.0");
    // A new process on the same ledger: the update is not INTERRUPTED, it waits for the verdict.
    const second = setup({ ledger, clock, updates: u.updates });
    await second.start();
    await flush();
    expect(u.calls).toContain("settle:up:1.0.0->2.0.0");
    expect(statusesIn(second.links.flatMap((l) => l.sent)).filter((s) => s.startsWith("up:"))).toEqual([]);
    u.decide({ ok: true, message: "updated from 1.0.0 to 2.0.0" });
    await flush();
    const final = second.links.flatMap((l) => l.sent).flatMap((f) => f.statuses).find((s) => s.taskId === "up" && s.state === TaskState.SUCCEEDED);
    expect(final?.message).toBe("updated from 1.0.0 to 2.0.0");
    expect(ledger.get("up")?.final?.state).toBe(TaskState.SUCCEEDED);
    expect(u.calls.at(-1)).toBe("forget:up");
  });

  it("a rollback ends the update FAILED with the reason; without update support it ends FAILED saying so", async () => {
    const u = recorder();
    const ledger = new RecordingLedger();
    await ledger.put({ spec: taskSpec("rolled", "h1"), state: TaskState.RUNNING, update: { from: "1.0.0", to: "2.0.0", at: 1 } });
    await ledger.put({ spec: taskSpec("orphan", "h1"), state: TaskState.RUNNING, update: { from: "1.0.0", to: "3.0.0", at: 1 } });
    u.decide({ ok: false, message: "rolled back to 1.0.0: it exited" });
    const t = setup({ ledger, updates: { ...u.updates, settle: async (id, up) => (id === "rolled" ? u.updates.settle(id, up, new AbortController().signal) : { ok: false, message: "x" }) } });
    await t.start();
    await flush();
    expect(ledger.get("rolled")?.final?.state).toBe(TaskState.FAILED);
    expect(ledger.get("rolled")?.final?.message).toBe("rolled back to 1.0.0: it exited");
    const bareLedger = new RecordingLedger();
    await bareLedger.put({ spec: taskSpec("u2", "h1"), state: TaskState.RUNNING, update: { from: "1", to: "2", at: 1 } });
    const bare = setup({ ledger: bareLedger });
    await bare.start();
    await flush();
    expect(bare.ledger.get("u2")?.final?.state).toBe(TaskState.FAILED);
    expect(bare.ledger.get("u2")?.final?.message).toMatch(/without update support/);
  });

  it("a hand-over the supervisor cannot be given ends the task FAILED and takes work again", async () => {
    const restarts: string[] = [];
    const t = setup({
      updates: { request: () => { throw new Error("disk full"); }, settle: async () => ({ ok: true, message: "" }), forget: () => undefined, abandoned: () => restarts.push("abandoned"), unable: () => undefined },
      onRestart: (why) => restarts.push(why),
    });
    await t.start();
    t.fromProxy({ tasks: [t.spec("up")] });
    await flush();
    t.executor.runs[0]!.finish({ restart });
    await flush();
    expect(t.ledger.get("up")?.final?.state).toBe(TaskState.FAILED);
    expect(t.ledger.get("up")?.final?.message).toBe("cannot hand the update over to the supervisor: disk full");
    expect(restarts).toEqual(["abandoned"]);
    t.fromProxy({ tasks: [t.spec("next")] });
    await flush();
    expect(t.executor.runs.map((r) => r.spec.taskId)).toEqual(["up", "next"]);
  });
});

describe("Agent: events (docs/triggers.md)", () => {
  const eventsIn = (frames: AgentStreamRequest[]) => frames.flatMap((f) => f.events.map((e) => e.id));
  it("keeps an event noticed with no stream until the proxy acknowledges it, sending it on each new stream until then", async () => {
    const t = setup();
    await t.agent.reportEvent(create(HostEventSchema, { id: "e1", hostId: "h1", tenant: "acme", kind: "service.failed", details: { unit: "nginx.service" } }));
    await t.start();
    expect(eventsIn(t.link().sent)).toEqual(["e1"]);
    // Not acknowledged: the next stream sends it again; an event noticed now goes at once.
    await t.reconnect();
    expect(eventsIn(t.link().sent)).toEqual(["e1"]);
    await t.agent.reportEvent(create(HostEventSchema, { id: "e2", hostId: "h1", tenant: "acme", kind: "service.recovered" }));
    await flush();
    expect(eventsIn(t.link().sent)).toEqual(["e1", "e2"]);
    t.fromProxy({ eventAcks: [{ hostId: "h1", eventId: "e1" }, { hostId: "h1", eventId: "e2" }] });
    await flush();
    await t.reconnect();
    expect(eventsIn(t.link().sent)).toEqual([]);
  });
});

describe("Agent: the events queue is bounded", () => {
  it("drops events past LIMITS.eventsQueuedPerHost while none are acknowledged, and says how many once the queue drains", async () => {
    const t = setup();
    const cap = LIMITS.eventsQueuedPerHost;
    for (let i = 0; i < cap + 5; i++) await t.agent.reportEvent(create(HostEventSchema, { id: `e${i}`, hostId: "h1", tenant: "acme", kind: "flap" }));
    await t.start();
    const sent = () => t.links.flatMap((l) => l.sent).flatMap((f) => f.events);
    expect(new Set(sent().map((e) => e.id)).size).toBe(cap);
    expect(sent().some((e) => e.id === `e${cap}`)).toBe(false);
    // The proxy acknowledges more than half: one event says what was dropped.
    t.fromProxy({ eventAcks: Array.from({ length: cap / 2 + 1 }, (_, i) => ({ hostId: "h1", eventId: `e${i}` })) });
    await flush();
    const dropped = sent().filter((e) => e.kind === "events.dropped");
    expect(dropped).toHaveLength(1);
    expect(dropped[0]!.details.count).toBe("5");
    expect(dropped[0]!.watcher).toBe("daemon");
    // Taken again from then on.
    await t.agent.reportEvent(create(HostEventSchema, { id: "after", hostId: "h1", tenant: "acme", kind: "flap" }));
    await flush();
    expect(sent().some((e) => e.id === "after")).toBe(true);
  });
});
