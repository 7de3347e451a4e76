/**
 * What arrives on the links is checked where it enters (common/link-limits.ts):
 * task ids, host ids, output seqs and task states that no honest peer sends
 * are dropped — never stored, looked up or acknowledged — and the stream
 * goes on. Findings F4, F5 and F7 of test/integration/rpc-fuzz.test.ts.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LIMITS } from "../../common/limits.js";
import { screenAcks, screenControllerFrame, screenHostFrame, screenProxyFrame, TASK_ID_CHARS } from "../../common/link-limits.js";
import { createLogger, silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import type { TaskRecord } from "../../controller/model.js";
import { serveProxyLink } from "../../controller/proxy-link.js";
import type { Revocations } from "../../controller/revocation.js";
import { AgentStreamRequestSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedDenyListSchema } from "../../gen/rexmesh/v1/revocation_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { FakeLink, chunk, counterIds, execStep, flush, operator, status, testSigning } from "./support.js";

const longId = "t".repeat(TASK_ID_CHARS + 1);
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const seqChunk = (taskId: string, seq: bigint) => ({ ...chunk(taskId, 1), seq });

describe("screening link frames", () => {
  it("drops a host's reports with a task id over the limit, a seq outside 1..2^53-1 or a state no version defines; keeps the rest", () => {
    const frame = create(AgentStreamRequestSchema, {
      output: [chunk("t1", 1), chunk(longId, 1), seqChunk("t1", 0n), seqChunk("t1", MAX_SAFE), seqChunk("t1", MAX_SAFE + 1n), seqChunk("t1", 2n ** 64n - 1n), chunk("", 1)],
      statuses: [status("t1", TaskState.RUNNING), status("t1", 2 ** 31 - 1), status(longId, TaskState.RUNNING), status("t1", 6 as TaskState), status("t1", TaskState.LOST), status("t1", TaskState.UNSPECIFIED)],
    });
    const refused = screenHostFrame(frame);
    expect(frame.output.map((c) => `${c.taskId}:${c.seq}`)).toEqual(["t1:1", `t1:${MAX_SAFE}`]);
    expect(frame.statuses.map((s) => `${s.taskId}:${s.state}`)).toEqual(["t1:5", "t1:18", "t1:0"]);
    expect(refused.count).toBe(8);
    expect(refused.firstField).toBe("output");
    // The reason names the field and the limit, and never carries the whole id.
    expect(refused.firstReason).toMatch(new RegExp(`^task_id is longer than ${TASK_ID_CHARS} characters \\(${TASK_ID_CHARS + 1}\\)`));
    expect(refused.firstReason!.length).toBeLessThan(200);
  });

  it("drops a proxy's presences naming host ids or tenants over the id limit, and its reports like a host's", () => {
    const longHost = "h".repeat(LIMITS.idChars + 1);
    const frame = create(ProxyStreamRequestSchema, {
      hello: { name: "px1", region: "eu", hosts: [{ hostId: longHost, tenant: "acme", connected: true }, { hostId: "h1", tenant: "acme", connected: true }] },
      hosts: [{ hostId: "h2", tenant: "t".repeat(LIMITS.idChars + 1), connected: true }, { hostId: "", tenant: "acme" }, { hostId: "h3", tenant: "acme" }],
      output: [seqChunk("t1", 2n ** 64n - 1n), { ...chunk("t1", 2), hostId: longHost }],
      statuses: [status("t".repeat(10_000), TaskState.RUNNING), status("t2", TaskState.SUCCEEDED, { hostId: "h1" })],
    });
    expect(screenProxyFrame(frame).count).toBe(6);
    expect(frame.hello!.hosts.map((h) => h.hostId)).toEqual(["h1"]);
    expect(frame.hosts.map((h) => h.hostId)).toEqual(["h3"]);
    expect(frame.output).toEqual([]);
    expect(frame.statuses.map((s) => s.taskId)).toEqual(["t2"]);
  });

  it("drops acknowledgements of seq 0 or beyond 2^53-1, of a state no version defines, and cancels naming ids over the limit", () => {
    const frame = create(ProxyStreamResponseSchema, {
      outputAcks: [{ taskId: "t1", seq: 3n }, { taskId: "t1", seq: 0n }, { taskId: "t1", seq: 2n ** 64n - 1n }, { taskId: longId, seq: 1n }, { taskId: "t2", seq: 10n ** 15n }],
      statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }, { taskId: "t1", state: 2 ** 31 - 1 }, { taskId: "t1", state: TaskState.RUNNING, atProxy: true }],
      cancels: [{ taskId: "t1", hostId: "h1" }, { taskId: longId, hostId: "h1" }, { taskId: "t2", hostId: "h".repeat(LIMITS.idChars + 1) }],
    });
    expect(screenControllerFrame(frame).count).toBe(6);
    expect(frame.outputAcks.map((a) => `${a.taskId}:${a.seq}`)).toEqual(["t1:3", `t2:${10n ** 15n}`]);
    expect(frame.statusAcks.map((a) => `${a.taskId}:${a.state}:${a.atProxy}`)).toEqual(["t1:10:false", "t1:5:true"]);
    expect(frame.cancels.map((c) => c.taskId)).toEqual(["t1"]);
    const onlyAcks = { outputAcks: [{ ...frame.outputAcks[0]!, seq: 0n }], statusAcks: [] };
    expect(screenAcks(onlyAcks).count).toBe(1);
    expect(onlyAcks.outputAcks).toEqual([]);
  });

  it("warns once per frame, with the count and the first reason", () => {
    const lines: string[] = [];
    const log = createLogger({ level: "info", write: (l) => lines.push(l) });
    const frame = create(AgentStreamRequestSchema, { statuses: Array.from({ length: 500 }, () => status("t1", 2 ** 31 - 1)) });
    screenHostFrame(frame).warn(log, "dropped");
    screenHostFrame(frame).warn(log, "nothing to say");
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!)).toMatchObject({ level: "warn", msg: "dropped", refused: 500, field: "statuses", reason: "state 2147483647 is not a task state" });
  });
});

/** Like LMDB: a key over 1978 bytes is a RangeError, which reached the proxy as INTERNAL (F4a). */
class KeyLimitStore extends MemoryJobStore {
  override getTask(id: string): TaskRecord | undefined {
    if (Buffer.byteLength(id) > 1978) throw new RangeError("Key size is larger than the maximum key size (1978)");
    return super.getTask(id);
  }
}

describe("status text cut to its limits", () => {
  it("a host's overlong message and signal are cut at the proxy, and again at the controller, so no status can outgrow a frame", () => {
    const huge = "x".repeat(9 * 1024 * 1024);
    const host = create(AgentStreamRequestSchema, { statuses: [{ taskId: "t1", state: TaskState.FAILED, message: huge, signal: "S".repeat(500) }, { taskId: "t2", state: TaskState.FAILED, message: "exit 3", signal: "SIGKILL" }] });
    expect(screenHostFrame(host).count).toBe(0);
    expect(host.statuses[0]!.message.length).toBe(LIMITS.statusMessageChars);
    expect(host.statuses[0]!.message.endsWith("…[truncated]")).toBe(true);
    expect(host.statuses[0]!.signal.length).toBe(LIMITS.statusSignalChars);
    expect(host.statuses[1]).toMatchObject({ message: "exit 3", signal: "SIGKILL" });
    const proxy = create(ProxyStreamRequestSchema, { statuses: [{ taskId: "t1", state: TaskState.FAILED, message: huge }], statusRuns: [{ state: TaskState.FAILED, message: huge, taskIds: ["t2"], hostIds: ["h2"] }] });
    // A run whose text is past statusRunTextChars is refused whole (it would be stored once per task it names); a whole status is cut.
    expect(screenProxyFrame(proxy).count).toBe(1);
    expect(proxy.statuses.map((x) => `${x.taskId}:${x.message.length}`)).toEqual([`t1:${LIMITS.statusMessageChars}`]);
    const small = create(ProxyStreamRequestSchema, { statusRuns: [{ state: TaskState.FAILED, message: "y".repeat(LIMITS.statusMessageChars + 10), taskIds: ["t2"], hostIds: ["h2"] }] });
    expect(screenProxyFrame(small).count).toBe(0);
    expect(small.statuses.map((x) => x.message.length)).toEqual([LIMITS.statusMessageChars]);
  });
});

describe("the controller's end of a proxy link", () => {
  function setup() {
    const clock = new ManualClock();
    const inventory = new Inventory();
    const jobs = new JobManager({ store: new KeyLimitStore(), inventory, clock, ids: counterIds(), log: silentLogger });
    jobs.start();
    const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const served = serveProxyLink({ jobs, inventory, clock, log: silentLogger, heartbeatMs: 10_000, signer: testSigning().signer, revocations }, link, { role: "proxy", scope: "eu", id: "px1" }).then(
      () => undefined,
      (e: unknown) => e,
    );
    const up = (init: Parameters<typeof create<typeof ProxyStreamRequestSchema>>[1]) => link.deliver(create(ProxyStreamRequestSchema, init));
    const acks = () => link.sent.flatMap((f) => [...f.outputAcks.map((a) => `o:${a.taskId}:${a.seq}`), ...f.statusAcks.map((a) => `s:${a.taskId}:${a.state}`)]);
    return { clock, inventory, jobs, link, served, up, acks };
  }

  it("drops a status naming a 10,000-character task id and a chunk of seq 2^64-1, acknowledges neither, and keeps the link (F4a, F5)", async () => {
    const t = setup();
    t.up({ hello: { name: "px1", region: "eu", hosts: [{ hostId: "h1", tenant: "acme", connected: true }] } });
    await flush();
    const job = await t.jobs.submit(operator("acme"), { hostIds: ["h1"], allHosts: false, steps: [execStep("true")], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliveryDeadlineMs: 0, idempotencyKey: "", idempotent: false });
    const id = job.taskIds[0]!;
    await flush();
    t.up({
      statuses: [status("t".repeat(10_000), TaskState.RUNNING), status(id, TaskState.RUNNING, { hostId: "h1" })],
      output: [seqChunk("no-such-task", 2n ** 64n - 1n), seqChunk(id, 2n ** 64n - 1n), { ...chunk(id, 1), hostId: "h1" }],
    });
    await flush();
    expect(t.link.isClosed).toBe(false);
    expect(t.acks()).toEqual([`o:${id}:1`, `s:${id}:${TaskState.RUNNING}`]);
    expect(t.jobs.getTaskRecord(id)).toMatchObject({ state: TaskState.RUNNING, outputChunks: 1 });
    // What is left of the stream still works.
    t.up({ statuses: [status(id, TaskState.SUCCEEDED, { hostId: "h1", outputChunks: 1n })] });
    await flush();
    expect(t.jobs.getTaskRecord(id)?.state).toBe(TaskState.SUCCEEDED);
    t.link.end();
    expect(await t.served).toBeUndefined();
  });

  it("looks up no task by an id over the limit (a results bundle names task ids too)", () => {
    const t = setup();
    expect(t.jobs.getTaskRecord("t".repeat(10_000))).toBeUndefined();
  });
});
