import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { MemoryBacklog, type UpwardItem } from "../../common/backlog.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Agent, resendOrder } from "../../daemon/agent.js";
import type { Executor, RunIo, TaskOutcome } from "../../daemon/executor.js";
import { MemoryLedger, type Ledger } from "../../daemon/ledger.js";
import { LmdbLedger } from "../../daemon/lmdb-ledger.js";
import { AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";
import { OutputChunkSchema, OutputStream, TaskState, TaskStatusSchema, type SignedTask, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LmdbEnv } from "../../common/lmdb.js";
import { FakeLink, asSigned, flush, taskSpec, testVerifier, text } from "./support.js";

type AgentSide = FakeLink<AgentStreamRequest, AgentStreamResponse>;

class FakeExecutor {
  readonly runs: { spec: TaskSpec; io: RunIo; finish: (o?: Partial<TaskOutcome>) => void }[] = [];
  run(spec: TaskSpec, io: RunIo): Promise<TaskOutcome> {
    return new Promise((resolve) => {
      this.runs.push({ spec, io, finish: (o = {}) => resolve({ state: TaskState.SUCCEEDED, message: "", outputChunks: 0, outputTruncated: false, ...o }) });
    });
  }
}

function agentWith(ledger: Ledger, outbox: MemoryBacklog) {
  const clock = new ManualClock();
  const executor = new FakeExecutor();
  const links: AgentSide[] = [];
  const agent = new Agent({
    hostId: "h1",
    tenant: "acme",
    proxies: ["px-a:7444"],
    dial: async () => {
      const link: AgentSide = new FakeLink();
      links.push(link);
      return link;
    },
    executor: executor as unknown as Executor,
    ledger,
    outbox,
    verifier: testVerifier(clock),
    facts: create(HostFactsSchema, { hostname: "h1" }),
    clock,
    log: silentLogger,
    capacity: 2,
    endLeftovers: async () => ({ killed: [], failed: [] }),
  });
  const link = () => links.at(-1)!;
  const fromProxy = (init: Omit<MessageInitShape<typeof AgentStreamResponseSchema>, "tasks" | "$typeName"> & { tasks?: (TaskSpec | SignedTask)[] }) =>
    link().deliver(create(AgentStreamResponseSchema, { ...init, tasks: (init.tasks ?? []).map(asSigned) }));
  const welcome = () => fromProxy({ welcome: { proxy: "px-a", region: "eu", heartbeatMs: 10_000 } });
  return { clock, executor, links, agent, link, fromProxy, welcome };
}

/** An outbox that refuses the next `refuse` writes holding output (a full map). */
class FlakyOutbox extends MemoryBacklog {
  refuse = 0;
  override push(items: readonly UpwardItem[]): Promise<void> {
    if (this.refuse > 0 && items.some((i) => i.kind === "output")) {
      this.refuse--;
      return Promise.reject(Object.assign(new Error("MDB_MAP_FULL"), { code: "MDB_MAP_FULL" }));
    }
    return super.push(items);
  }
}

/** An agent on this ledger and outbox, welcomed, running task t1. */
async function runningT1(ledger: Parameters<typeof agentWith>[0], outbox: Parameters<typeof agentWith>[1]) {
  const a = agentWith(ledger, outbox);
  await a.agent.start();
  await flush();
  a.welcome();
  await flush();
  a.fromProxy({ tasks: [taskSpec("t1", "h1", { deliverByMs: a.clock.now() + 3_600_000 })] });
  await flush();
  return a;
}

/** An agent on a FlakyOutbox, welcomed, running task t1. */
async function runningOnFlakyOutbox() {
  const outbox = new FlakyOutbox();
  return { a: await runningT1(new MemoryLedger(), outbox), outbox };
}

const outputIn = (frames: AgentStreamRequest[]) => frames.flatMap((f) => f.output.map((c) => `${c.seq}:${text(c.data)}`));

describe("review: daemon", () => {
  it("D1 an idempotent task run again after a crash delivers the second run's output", async () => {
    const ledger = new MemoryLedger();
    const outbox = new MemoryBacklog();
    const a = agentWith(ledger, outbox);
    await a.agent.start();
    await flush();
    a.welcome();
    await flush();
    a.fromProxy({ tasks: [taskSpec("t1", "h1", { deliverByMs: a.clock.now() + 3_600_000, idempotent: true })] });
    await flush();
    a.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("first run, cut short\n"), 1);
    await flush();
    // SIGKILL: the daemon dies with chunk 1 unacknowledged. A new process starts on the same store.
    const b = agentWith(ledger, outbox);
    await b.agent.start();
    await flush();
    b.welcome();
    await flush();
    expect(b.executor.runs).toHaveLength(1); // run again: the job is idempotent
    b.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("second run: all done\n"), 1);
    b.executor.runs[0]!.finish({ exitCode: 0, outputChunks: 1 });
    await flush();
    // A proxy keeps the first chunk of each seq it sees and drops later ones as duplicates (seq <= outputSeq), as does the
    // controller: what they keep is the first chunk sent under each seq. The first run's chunk 1, still in the outbox, goes
    // again; the second run's output is numbered after it, so it is kept too, and never taken for the first run's.
    const kept = new Map<string, string>();
    for (const s of outputIn(b.link().sent)) if (!kept.has(s.split(":")[0]!)) kept.set(s.split(":")[0]!, s);
    expect([...kept.values()]).toEqual(["1:first run, cut short\n", "2:second run: all done\n"]);
    // The signed end counts every chunk a receiver must hold, says which are this run's, and signs no digest over bytes
    // the host cannot know (the controller hashes chunks 1..outputChunks and would call one over this run's alone a forgery).
    const end = b.link().sent.flatMap((f) => f.statuses).find((s) => s.state === TaskState.SUCCEEDED)!;
    expect(end.outputChunks).toBe(2n);
    expect(end.outputSha256).toHaveLength(0);
    expect(end.message).toContain("this run's output starts at chunk 2");
  });

  it("D2 a task whose ledger write failed is run (or ended) once the store works again, not answered DELIVERED for ever", async () => {
    let fail = false;
    const db = {
      getRange: () => [],
      put: () => (fail ? ((fail = false), Promise.reject(Object.assign(new Error("MDB_MAP_FULL"), { code: "MDB_MAP_FULL" }))) : Promise.resolve(true)),
      remove: () => Promise.resolve(true),
    };
    const ledger = new LmdbLedger(db as never, "h1");
    const a = agentWith(ledger, new MemoryBacklog());
    await a.agent.start();
    await flush();
    a.welcome();
    await flush();
    const spec = taskSpec("t1", "h1", { deliverByMs: a.clock.now() + 3_600_000 });
    fail = true;
    a.fromProxy({ tasks: [spec] });
    await flush();
    // The frame failed, the stream dropped; the daemon reconnects and the proxy hands the DISPATCHED task again.
    a.clock.advance(5000);
    await flush();
    a.welcome();
    await flush();
    a.fromProxy({ tasks: [spec] });
    await flush();
    // Taken as new (the failed write left nothing behind to answer from), stored, and started: not answered DELIVERED
    // from memory alone and never run, which left the task without an end while the host stayed connected.
    const states = a.link().sent.flatMap((f) => f.statuses.map((s) => TaskState[s.state]));
    expect(states).toEqual(["DELIVERED", "RUNNING"]);
    expect(a.executor.runs).toHaveLength(1);
  });

  it("D1 an idempotent task's chunk leaves the host only once its seq is recorded; one kept but not recorded when the daemon died is not numbered again", async () => {
    // The ledger's output seq write hangs: the daemon dies before it commits.
    class StuckLedger extends MemoryLedger {
      stuck = true;
      override putOutputSeq(taskId: string, seq: number): Promise<void> {
        return this.stuck ? new Promise(() => {}) : super.putOutputSeq(taskId, seq);
      }
    }
    const ledger = new StuckLedger();
    const outbox = new MemoryBacklog();
    const a = agentWith(ledger, outbox);
    await a.agent.start();
    await flush();
    a.welcome();
    await flush();
    a.fromProxy({ tasks: [taskSpec("t1", "h1", { deliverByMs: a.clock.now() + 3_600_000, idempotent: true })] });
    await flush();
    a.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("first run\n"), 1);
    await flush();
    expect(outputIn(a.link().sent)).toEqual([]); // kept in the outbox, not sent: its seq is not recorded
    // A new stream resends the outbox, but not a chunk held back.
    a.link().end();
    await flush();
    a.clock.advance(5000);
    await flush();
    a.welcome();
    await flush();
    expect(a.links).toHaveLength(2);
    expect(outputIn(a.link().sent)).toEqual([]);
    expect(ledger.outputSeq("t1")).toBe(0);

    // SIGKILL. The chunk is in the outbox, so the next stream sends it: the run again must number after it.
    ledger.stuck = false;
    const b = agentWith(ledger, outbox);
    await b.agent.start();
    await flush();
    b.welcome();
    await flush();
    expect(b.executor.runs).toHaveLength(1);
    b.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("second run\n"), 1);
    b.executor.runs[0]!.finish({ exitCode: 0, outputChunks: 1 });
    await flush();
    expect(outputIn(b.link().sent)).toEqual(["1:first run\n", "2:second run\n"]);
    expect(ledger.outputSeq("t1")).toBe(2);
    const end = b.link().sent.flatMap((f) => f.statuses).find((s) => s.state === TaskState.SUCCEEDED)!;
    expect(end.outputChunks).toBe(2n);
  });

  it("D2 a task whose start could not be recorded is answered as stored (DELIVERED) and started once the write succeeds", async () => {
    let refuse = 2;
    const puts: string[] = [];
    const db = {
      getRange: () => [],
      put: (_key: string[], value: { state: TaskState }) => {
        puts.push(TaskState[value.state]);
        if (value.state === TaskState.RUNNING && refuse > 0) {
          refuse--;
          return Promise.reject(Object.assign(new Error("MDB_MAP_FULL"), { code: "MDB_MAP_FULL" }));
        }
        return Promise.resolve(true);
      },
      remove: () => Promise.resolve(true),
    };
    const ledger = new LmdbLedger(db as never, "h1");
    const a = agentWith(ledger, new MemoryBacklog());
    await a.agent.start();
    await flush();
    a.welcome();
    await flush();
    const spec = taskSpec("t1", "h1", { deliverByMs: a.clock.now() + 3_600_000 });
    a.fromProxy({ tasks: [spec] });
    await flush();
    expect(a.executor.runs).toHaveLength(0);
    expect(ledger.get("t1")?.state).toBe(TaskState.DELIVERED); // what is stored, not the start that was refused
    a.fromProxy({ tasks: [spec] }); // delivered again meanwhile: answered from what is stored, not run twice
    await flush();
    for (let i = 0; i < 4; i++) {
      a.clock.advance(2000);
      await flush();
    }
    expect(a.executor.runs).toHaveLength(1);
    expect(puts).toEqual(["DELIVERED", "RUNNING", "RUNNING", "RUNNING"]);
    expect(ledger.get("t1")?.state).toBe(TaskState.RUNNING);
    a.executor.runs[0]!.finish({ exitCode: 0 });
    await flush();
    const states = a.links.flatMap((l) => l.sent).flatMap((f) => f.statuses.map((s) => TaskState[s.state]));
    expect(states).toEqual(["DELIVERED", "DELIVERED", "RUNNING", "SUCCEEDED"]);
  });

  it("D2 a task whose end could not be recorded keeps its slot and reports the end once it is stored, not never", async () => {
    let refuse = 1;
    const db = {
      getRange: () => [],
      put: (_key: string[], value: { final?: Uint8Array }) => {
        if (value.final && refuse > 0) {
          refuse--;
          return Promise.reject(Object.assign(new Error("MDB_MAP_FULL"), { code: "MDB_MAP_FULL" }));
        }
        return Promise.resolve(true);
      },
      remove: () => Promise.resolve(true),
    };
    const ledger = new LmdbLedger(db as never, "h1");
    const a = await runningT1(ledger, new MemoryBacklog());
    a.executor.runs[0]!.finish({ exitCode: 0 });
    await flush();
    const statuses = () => a.link().sent.flatMap((f) => f.statuses.map((s) => TaskState[s.state]));
    expect(statuses()).toEqual(["DELIVERED", "RUNNING"]);
    expect(ledger.get("t1")?.state).toBe(TaskState.RUNNING); // what is stored: the end is not
    expect(ledger.get("t1")?.final).toBeUndefined();
    a.clock.advance(2000);
    await flush();
    expect(statuses()).toEqual(["DELIVERED", "RUNNING", "SUCCEEDED"]);
    expect(ledger.get("t1")?.final?.state).toBe(TaskState.SUCCEEDED);
  });

  it("D3 a chunk whose outbox write failed is kept once the store works again and sent on the next stream, not lost with the stream", async () => {
    const { a, outbox } = await runningOnFlakyOutbox();
    outbox.refuse = 1;
    a.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("the only line\n"), 1);
    await flush();
    // A task that never runs twice sends its chunks at once: this one is on the stream, though the outbox refused it.
    expect(outputIn(a.link().sent)).toEqual(["1:the only line\n"]);
    // The stream drops before the proxy stored the chunk. The outbox write is tried again (STORE_RETRY) and the
    // daemon dials again: the chunk goes on the new stream from the outbox, where it used to be gone.
    a.link().end();
    await flush();
    a.clock.advance(5000);
    await flush();
    expect(a.links).toHaveLength(2);
    a.welcome();
    await flush();
    expect(outputIn(a.link().sent)).toEqual(["1:the only line\n"]);
  });

  it("D3 a chunk whose outbox write is still being retried goes on a new stream before the task's later chunks", async () => {
    const { a, outbox } = await runningOnFlakyOutbox();
    outbox.refuse = 3; // chunk 1's write and its first two retries
    a.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("one\n"), 1);
    await flush();
    a.executor.runs[0]!.io.onOutput(OutputStream.STDOUT, new TextEncoder().encode("two\n"), 2);
    await flush();
    // The stream drops; the daemon dials again while chunk 1 is still being retried (only chunk 2 is in the outbox).
    a.link().end();
    await flush();
    a.clock.advance(1300);
    await flush();
    expect(a.links).toHaveLength(2);
    a.welcome();
    await flush();
    // A proxy holding chunk 2 would take a later chunk 1 for a duplicate: it goes first.
    expect(outputIn(a.link().sent)).toEqual(["1:one\n", "2:two\n"]);
  });

  it("a new stream resends a task's chunks in seq order and its end after them, whatever order they were stored in", () => {
    const chunk = (seq: number): UpwardItem => ({ kind: "output", chunk: create(OutputChunkSchema, { taskId: "t1", seq: BigInt(seq) }) });
    const st = (taskId: string, state: TaskState): UpwardItem => ({ kind: "status", status: create(TaskStatusSchema, { taskId, state }) });
    const order = resendOrder([st("t1", TaskState.RUNNING), chunk(2), st("t2", TaskState.RUNNING), st("t1", TaskState.SUCCEEDED), chunk(1), chunk(3)]).map((i) =>
      i.kind === "output" ? `${i.chunk.taskId}:${i.chunk.seq}` : i.kind === "status" ? `${i.status.taskId}:${TaskState[i.status.state]}` : `event:${i.event.id}`,
    );
    expect(order).toEqual(["t1:RUNNING", "t1:1", "t1:2", "t1:3", "t1:SUCCEEDED", "t2:RUNNING"]);
  });

  it("D2 the LMDB ledger answers what is stored after a refused update or removal", async () => {
    let refuse = false;
    const refused = () => Promise.reject(Object.assign(new Error("MDB_MAP_FULL"), { code: "MDB_MAP_FULL" }));
    const db = {
      getRange: () => [],
      put: () => (refuse ? refused() : Promise.resolve(true)),
      remove: () => (refuse ? refused() : Promise.resolve(true)),
    };
    const ledger = new LmdbLedger(db as never, "h1");
    const spec = taskSpec("t1", "h1", {});
    const delivered = { spec, state: TaskState.DELIVERED };
    await ledger.put(delivered);
    refuse = true;
    await expect(ledger.put({ spec, state: TaskState.RUNNING })).rejects.toThrow("MDB_MAP_FULL");
    expect(ledger.get("t1")).toBe(delivered);
    await expect(ledger.remove("t1")).rejects.toThrow("MDB_MAP_FULL");
    expect(ledger.get("t1")).toBe(delivered);
    await expect(ledger.putOutputSeq("t1", 5)).rejects.toThrow("MDB_MAP_FULL");
    expect(ledger.outputSeq("t1")).toBe(0);
    await expect(ledger.put({ spec: taskSpec("t2", "h1", {}), state: TaskState.DELIVERED })).rejects.toThrow("MDB_MAP_FULL");
    expect(ledger.get("t2")).toBeUndefined();
    expect(ledger.all()).toEqual([delivered]);
  });

  it("D1 the LMDB ledger keeps a task's output seq beside its entry, reads both back, and drops both", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-ledger-"));
    try {
      const env = new LmdbEnv({ path: dir, maxBytes: 16 << 20 });
      const db = env.db("ledger");
      const first = new LmdbLedger(db as never, "h1");
      const other = new LmdbLedger(db as never, "h2");
      await first.put({ spec: taskSpec("t1", "h1", { idempotent: true }), state: TaskState.RUNNING });
      await first.put({ spec: taskSpec("t2", "h1", {}), state: TaskState.DELIVERED });
      await other.put({ spec: taskSpec("t1", "h2", {}), state: TaskState.DELIVERED });
      await first.putOutputSeq("t1", 7);
      await first.putOutputSeq("t1", 3); // never lowered
      expect(first.outputSeq("t1")).toBe(7);
      const again = new LmdbLedger(db as never, "h1");
      expect(again.outputSeq("t1")).toBe(7);
      expect(again.outputSeq("t2")).toBe(0);
      expect(again.all().map((e) => `${e.spec.taskId}:${TaskState[e.state]}`).sort()).toEqual(["t1:RUNNING", "t2:DELIVERED"]);
      expect(new LmdbLedger(db as never, "h2").outputSeq("t1")).toBe(0);
      await again.remove("t1");
      const after = new LmdbLedger(db as never, "h1");
      expect(after.get("t1")).toBeUndefined();
      expect(after.outputSeq("t1")).toBe(0);
      await env.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
