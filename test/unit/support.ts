/**
 * Helpers shared by the unit tests: in-memory stream links, event-loop
 * flushing, and small factories for protobuf messages. Nothing here touches
 * the network, the file system or real time.
 */
import { expect } from "vitest";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { PeerIdentity } from "../../certs/identity.js";
import type { ProxyPort, SubmitRequest } from "../../controller/jobs.js";
import { AsyncQueue } from "../../common/async-queue.js";
import type { FrameLink } from "../../common/frame-link.js";
import { ManualClock } from "../../common/clock.js";
import { peekSpec, TaskSigner, TaskVerifier } from "../../common/task-signing.js";
import {
  OutputChunkSchema,
  OutputStream,
  StepSchema,
  TaskSpecSchema,
  TaskStatusSchema,
  type OutputChunk,
  type SignedTask,
  type Step,
  type TaskSpec,
  type TaskState,
  type TaskStatus,
} from "../../gen/rexmesh/v1/task_pb.js";
import { testCa, testCredentials } from "../test-ca.js";

/**
 * One side of an in-memory stream. `incoming` is fed by the test with
 * `deliver`; what the code under test sends is recorded in `sent`.
 */
export class FakeLink<Out, In> implements FrameLink<Out, In> {
  readonly queue = new AsyncQueue<In>();
  readonly incoming: AsyncIterable<In> = this.queue;
  readonly sent: Out[] = [];
  /** Frames "queued but not written"; tests raise it to simulate a slow peer. */
  backlog = 0;
  isClosed = false;
  private readonly drainWaiters: (() => void)[] = [];

  whenWritable(frames: number): Promise<void> {
    if (this.backlog < frames || this.isClosed) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** The peer has read everything queued. */
  drain(): void {
    this.backlog = 0;
    for (const w of this.drainWaiters.splice(0)) w();
  }
  closeError: Error | undefined;
  private resolveClosed!: () => void;
  readonly closed = new Promise<void>((r) => (this.resolveClosed = r));

  send(frame: Out): void {
    if (!this.isClosed) this.sent.push(frame);
  }

  close(error?: Error): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closeError = error;
    this.queue.close(error);
    this.resolveClosed();
  }

  /** A frame from the peer. */
  deliver(frame: In): void {
    this.queue.push(frame);
  }

  /** The peer ends the stream gracefully. */
  end(): void {
    this.queue.close();
  }
}

/** One turn of the event loop: lets microtasks and setImmediate callbacks (the coalescers) run. */
export function tick(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Several turns, for chains of awaits that span more than one. */
export async function flush(turns = 6): Promise<void> {
  for (let i = 0; i < turns; i++) await tick();
}

/** Checks that `drain` resolves when `ms` have passed on the clock, and not a millisecond before. */
export async function expectResolvesAfter(clock: ManualClock, drain: Promise<unknown>, ms: number): Promise<void> {
  let done = false;
  const settled = drain.then(() => (done = true));
  await flush();
  clock.advance(ms - 1);
  await flush();
  expect(done).toBe(false);
  clock.advance(1);
  await flush();
  expect(done).toBe(true);
  await settled;
}

/** Predictable ids: prefix + zero-padded counter, sorting in creation order. */
/**
 * Waits in real time (LMDB commits in its own thread) until `ok` holds, at
 * most 5 s; `step` runs before each look (e.g. letting a wired link settle).
 */
export async function eventually(ok: () => boolean, step?: () => Promise<void>): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    await step?.();
    if (ok()) return;
    if (Date.now() > deadline) throw new Error("condition not met within 5 s");
    await new Promise((r) => setTimeout(r, 5));
  }
}

export function counterIds(): (prefix: string) => string {
  let n = 0;
  return (prefix) => `${prefix}${String(++n).padStart(6, "0")}`;
}

export const operator = (tenant = "acme", id = "alice"): PeerIdentity => ({ role: "operator", scope: tenant, id });
export const hostPeer = (id: string, tenant = "acme"): PeerIdentity => ({ role: "host", scope: tenant, id });

export const execStep = (...argv: string[]): Step => create(StepSchema, { tool: { case: "exec", value: { argv } } });

export function taskSpec(taskId: string, hostId: string, more: Partial<Omit<TaskSpec, "$typeName">> & { deliverByMs?: number } = {}): TaskSpec {
  const { deliverByMs, ...rest } = more;
  return create(TaskSpecSchema, {
    taskId,
    jobId: "j1",
    tenant: "acme",
    hostId,
    steps: [execStep("true")],
    ...rest,
    ...(deliverByMs !== undefined ? { deliverBy: timestampFromMs(deliverByMs) } : {}),
  });
}

export function status(taskId: string, state: TaskState, more: Partial<Omit<TaskStatus, "$typeName">> = {}): TaskStatus {
  return create(TaskStatusSchema, { taskId, state, ...more });
}

export function chunk(taskId: string, seq: number, text = `chunk ${seq}\n`, stream = OutputStream.STDOUT): OutputChunk {
  return create(OutputChunkSchema, { taskId, seq: BigInt(seq), stream, data: new TextEncoder().encode(text) });
}

export const text = (data: Uint8Array): string => new TextDecoder().decode(data);

let signing: { signer: TaskSigner; caPem: string } | undefined;

/**
 * A controller signing key for tests, endorsed by the run's test CA
 * (long-lived, and valid at ManualClock's default time), so that tests can
 * hand proxies and daemons tasks as the controller would.
 */
export function testSigning(): { signer: TaskSigner; caPem: string } {
  if (!signing) {
    const clock = new ManualClock(Date.UTC(2025, 0, 1));
    const tenYears = 10 * 365 * 86_400_000;
    const creds = testCredentials({ role: "controller", scope: "mesh", id: "ctl" }, { clock, validityMs: tenYears });
    signing = { signer: new TaskSigner(creds, clock, tenYears), caPem: testCa().certPem };
  }
  return signing;
}

/** A task as the test controller signs it; a SignedTask passes through untouched. */
export function asSigned(task: TaskSpec | SignedTask): SignedTask {
  return task.$typeName === "rexmesh.v1.TaskSpec" ? testSigning().signer.sign(task) : task;
}

/** A verifier that trusts the test controller's key. */
export function testVerifier(clock: ManualClock): TaskVerifier {
  const v = new TaskVerifier(testSigning().caPem, clock);
  v.addKeys([testSigning().signer.key]);
  return v;
}

/** The task id inside a signed task. */
export const signedId = (t: SignedTask): string => peekSpec(t)?.taskId ?? "?";

/** A proxy as the controller sees it, recording the tasks it is sent and its cancels as "cancel:<task>" / "withdraw:<task>". */
export class RecordingPort implements ProxyPort {
  readonly tasks: TaskSpec[] = [];
  readonly cancels: string[] = [];
  constructor(
    readonly name: string,
    readonly region = "eu",
  ) {}
  sendTask(spec: TaskSpec): void {
    this.tasks.push(spec);
  }
  sendCancel(taskId: string, _hostId: string, withdraw = false): void {
    this.cancels.push(`${withdraw ? "withdraw" : "cancel"}:${taskId}`);
  }
}

/** A submit request to h1 running `true`, every other field at its default; `more` on top. */
export function submitRequest(more: Partial<SubmitRequest> = {}): SubmitRequest {
  return {
    hostIds: ["h1"],
    allHosts: false,
    steps: [execStep("true")],
    env: {},
    workingDir: "",
    stdin: new Uint8Array(),
    timeoutMs: 0,
    deliveryDeadlineMs: 0,
    idempotencyKey: "",
    idempotent: false,
    ...more,
  };
}

/** Two ends of an in-memory stream: what one sends, the other receives; a close ends the other's incoming. */
export class WiredLink<Out, In> extends FakeLink<Out, In> {
  other: WiredLink<In, Out> | undefined;
  override send(frame: Out): void {
    if (this.isClosed) return;
    super.send(frame);
    this.other?.deliver(frame);
  }
  override close(error?: Error): void {
    if (this.isClosed) return;
    super.close(error);
    this.other?.end();
  }
}

export function wire<A, B>(): [WiredLink<A, B>, WiredLink<B, A>] {
  const a = new WiredLink<A, B>();
  const b = new WiredLink<B, A>();
  a.other = b;
  b.other = a;
  return [a, b];
}
