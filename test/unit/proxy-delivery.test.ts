/**
 * The proxy keeps what it holds until the next hop really has it: chunks the
 * controller held back survive acks of later chunks until their replay is
 * taken; a task goes to its host only once its hand-over is stored; a write
 * that fails leaves the task as it was; a settled task is removed and marked
 * in one commit.
 */
import { describe, expect, it } from "vitest";
import type { UpwardItem } from "../../common/backlog.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { MemoryProxyStore, type TaskMark } from "../../proxy/store.js";
import { chunk, flush, status, taskSpec } from "./support.js";
import { handed, proxyHarness, upStatuses } from "./proxy-harness.js";

const heldChunks = (store: MemoryProxyStore) => store.upward().flatMap((i) => (i.kind === "output" ? [`${i.chunk.taskId}:${i.chunk.seq}`] : []));
const enospc = () => Object.assign(new Error("No space left on device"), { code: "ENOSPC" });

/** A memory store whose writes can be made to fail or to wait. */
class TestStore extends MemoryProxyStore {
  failPush = 0;
  gate: Promise<void> | undefined;
  readonly calls: string[] = [];

  override async pushUpward(items: readonly UpwardItem[]): Promise<void> {
    if (this.failPush > 0) {
      this.failPush--;
      throw enospc();
    }
    await this.gate;
    return super.pushUpward(items);
  }

  override removeTask(taskId: string): Promise<void> {
    this.calls.push(`remove ${taskId}`);
    const done = super.removeTask(taskId);
    return this.gate ? this.gate.then(() => done) : done;
  }

  override mark(taskId: string, kind: TaskMark, until: number): Promise<void> {
    this.calls.push(`mark ${taskId} ${kind}`);
    return super.mark(taskId, kind, until);
  }
}

function setup(opts: { sweepMs?: number } = {}) {
  return proxyHarness(new TestStore(), { sweepMs: opts.sweepMs ?? 1e9 });
}

/**
 * The controller's output handling on a proxy link (controller/proxy-link.ts):
 * reports on a host it does not count as held by this proxy are held back —
 * neither taken nor acknowledged — and a replay is asked for once the host's
 * presence is accepted; a frame's taken chunks are acknowledged with their
 * highest seq per task. Frames are answered in order, when the test says.
 */
class Upstream {
  readonly got = new Set<string>();
  private readonly held = new Set<string>();
  private readonly heldBack = new Set<string>();
  private read = 0;

  constructor(private readonly ctl: ReturnType<ReturnType<typeof setup>["connectController"]>) {}

  /** Answers the proxy's frames not yet answered (at most `frames` of them). */
  answer(frames = Infinity): void {
    for (let i = 0; i < frames && this.read < this.ctl.link.sent.length; i++) {
      const frame = this.ctl.link.sent[this.read++]!;
      const highest = new Map<string, bigint>();
      for (const c of frame.output) {
        if (!this.held.has(c.hostId)) {
          this.heldBack.add(c.hostId);
          continue;
        }
        this.got.add(`${c.taskId}:${c.seq}`);
        highest.set(c.taskId, (highest.get(c.taskId) ?? 0n) > c.seq ? highest.get(c.taskId)! : c.seq);
      }
      if (highest.size > 0) this.ctl.send({ outputAcks: [...highest].map(([taskId, seq]) => ({ taskId, seq })) });
    }
  }

  /** The host's presence through this proxy is accepted. */
  accept(hostId: string): void {
    this.held.add(hostId);
    if (this.heldBack.delete(hostId)) this.ctl.send({ replay: true });
  }
}

describe("proxy: chunks held back by the controller", () => {
  it("survive an ack of a later chunk that arrives after their replay went out, and go once the replay is taken", async () => {
    const t = setup();
    const h = t.connectHost("h1", 0);
    await flush();
    // h1 brought t1 from another proxy: its first chunks reach px1 before the controller link.
    h.send({ output: [chunk("t1", 1), chunk("t1", 2)] });
    await flush();
    const ctl = t.connectController();
    const up = new Upstream(ctl);
    await flush();
    ctl.send({ welcome: { heartbeatMs: 10_000, presenceNonce: new Uint8Array([1]) } });
    await flush();
    up.answer(); // chunks 1-2: h1 is not known to be held here yet: held back
    h.send({ output: [chunk("t1", 3)] });
    await flush();
    up.accept("h1"); // -> replay
    await flush(); // the proxy resends what it holds
    up.answer(1); // the controller only now takes the frame with chunk 3, sent before the replay: ack 3
    await flush();
    // The ack of 3 says nothing of chunks 1-2, whose resends the controller has not read yet.
    expect(heldChunks(t.store)).toEqual(["t1:1", "t1:2"]);
    up.answer();
    await flush();
    expect([...up.got].sort()).toEqual(["t1:1", "t1:2", "t1:3"]);
    // Every chunk went with the controller's acks of the resends: nothing lingers.
    expect(heldChunks(t.store)).toEqual([]);
  });

  it("lose nothing and linger nowhere when several tasks and a new link are involved", async () => {
    const t = setup();
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ output: [chunk("a", 1), chunk("b", 1), chunk("a", 2)] });
    await flush();
    const ctl = t.connectController();
    const up = new Upstream(ctl);
    await flush();
    up.answer(); // all held back
    h.send({ output: [chunk("a", 3), chunk("b", 2)] });
    await flush();
    up.accept("h1");
    ctl.send({ outputAcks: [{ taskId: "b", seq: 2n }] }); // as if b:2 had been taken on its way
    await flush();
    expect(heldChunks(t.store)).toEqual(["a:1", "b:1", "a:2", "a:3"]);
    // The link drops before the resends are answered; a new one replays everything, cumulative acks again.
    ctl.link.close();
    await flush();
    const ctl2 = t.connectController();
    const up2 = new Upstream(ctl2);
    up2.accept("h1");
    await flush();
    up2.answer();
    await flush();
    expect([...up2.got].sort()).toEqual(["a:1", "a:2", "a:3", "b:1"]);
    expect(heldChunks(t.store)).toEqual([]);
  });
});

describe("proxy: hand-over of a task", () => {
  it("reaches the host only once its DISPATCHED is stored", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    let open!: () => void;
    t.store.gate = new Promise((r) => (open = r));
    const h = t.connectHost("h1", 1);
    await flush();
    expect(handed(h.link)).toEqual([]);
    open();
    await flush();
    expect(handed(h.link)).toEqual(["t1"]);
    expect(t.store.upward().some((i) => i.kind === "status" && i.status.state === TaskState.DISPATCHED)).toBe(true);
  });

  it("whose write failed is not handed over: the task waits again, and the host's credit is its own", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    t.store.failPush = 1;
    const h = t.connectHost("h1", 1);
    await flush();
    expect(handed(h.link)).toEqual([]);
    expect(t.store.getTask("t1")?.state).toBe(TaskState.QUEUED);
    // The next occasion to deliver (here: new tasks for the host) hands it over with the credit kept.
    ctl.send({ tasks: [taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    await flush();
    expect(handed(h.link)).toEqual(["t1"]);
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t2:QUEUED", "t1:DISPATCHED"]);
  });
});

describe("proxy: writes that fail", () => {
  it("an expiry that was not stored is undone and made again by the next sweep", async () => {
    const t = setup({ sweepMs: 1000 });
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future(1500) })] });
    await flush();
    t.store.failPush = 1;
    t.clock.advance(2000);
    await flush();
    expect(t.store.getTask("t1")?.state).toBe(TaskState.QUEUED);
    t.clock.advance(1000);
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t1:EXPIRED"]);
  });

  it("a host's report on a task it brought from elsewhere, not stored, leaves no record: its resend takes it on", async () => {
    const t = setup();
    const ctl = t.connectController();
    await flush();
    const a = t.connectHost("h1", 0);
    await flush();
    t.store.failPush = 1;
    a.send({ statuses: [status("t9", TaskState.RUNNING)], output: [chunk("t9", 1)] });
    await flush();
    expect(await a.settled).toBeInstanceOf(Error);
    expect(t.store.getTask("t9")).toBeUndefined();
    const b = t.connectHost("h1", 0);
    await flush();
    b.send({ statuses: [status("t9", TaskState.RUNNING)], output: [chunk("t9", 1)] });
    await flush();
    expect(upStatuses(ctl.link)).toContain("t9:RUNNING");
    expect(heldChunks(t.store)).toEqual(["t9:1"]);
  });
});

describe("proxy: a settled task", () => {
  it("is removed and marked in one commit (both writes issued before either completes)", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    const h = t.connectHost("h1", 1);
    await flush();
    h.send({ statuses: [status("t1", TaskState.SUCCEEDED, { exitCode: 0 })] });
    await flush();
    let open!: () => void;
    t.store.gate = new Promise((r) => (open = r));
    ctl.send({ statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }] });
    await flush();
    expect(t.store.calls).toEqual(["remove t1", "mark t1 done"]);
    open();
    await flush();
    expect(t.store.markOf("t1")).toBe("done");
  });
});
