/**
 * The proxy keeps what it holds until the next hop really has it: chunks the
 * controller held back survive acks of later chunks until their replay is
 * stored; a task goes to its host only once its hand-over is stored; a write
 * that fails leaves the task as it was; a settled task is removed and marked
 * in one commit.
 */
import { describe, expect, it } from "vitest";
import type { UpwardItem } from "../../common/backlog.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { MemoryProxyStore, type TaskMark } from "../../proxy/store.js";
import { chunk, flush, status, taskSpec } from "./support.js";
import { handed, proxyHarness, upStatuses, type HostSide } from "./proxy-harness.js";
import { nonceSentTo, realController } from "./real-controller.js";

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

/** h1's proof of presence over the nonce the proxy passed it (the controller takes it on the proxy's word here: no host keys). */
const proof = (h: HostSide) => ({ presenceNonce: nonceSentTo(h), presenceProof: new Uint8Array([1]), presenceSalt: new Uint8Array([2]) });

/**
 * Against the controller's own link handler (controller/proxy-link.ts):
 * reports on a host it does not yet count as held by this proxy are held
 * back — neither taken nor acknowledged — and a replay is asked for once the
 * host's presence is accepted; its output acks are cumulative and never
 * pass a chunk held back from the link until that chunk is stored.
 */
describe("proxy: chunks held back by the controller", () => {
  it("survive an ack of a later chunk that the controller made after asking for their replay, and reach its store", async () => {
    const t = setup();
    const c = realController(t.clock);
    const id = await c.runningTask();
    const h = t.connectHost("h1", 0);
    await flush();
    // h1 failed over from pxA with the task running: its first chunks reach px1 before the controller link.
    h.send({ output: [chunk(id, 1), chunk(id, 2)] });
    await flush();
    const w = c.link(t.core);
    await flush();
    w.up(); // the hello and chunks 1-2: px1 is not known to hold h1, so they are held back
    await flush();
    expect(c.stored(id, 1)).toBe(false);
    w.down(); // the welcome: px1 asks h1 to prove its presence
    await flush();
    h.send(proof(h.link));
    await flush();
    w.up(); // h1's presence: accepted, a replay asked for
    await flush();
    h.send({ output: [chunk(id, 3)] });
    await flush();
    w.down(); // the replay reaches px1 before the controller has read the frame with chunk 3: px1 resends what it holds
    await flush();
    expect(w.pendingUp()[0]!.output.map((ch) => Number(ch.seq))).toEqual([3]);
    w.up(1); // the controller only now reads chunk 3's frame, sent before the replay: taken...
    await flush();
    w.down();
    await flush();
    expect(c.stored(id, 3)).toBe(true);
    // ...and its ack says nothing of chunks 1-2, whose resends the controller has not read yet: px1 keeps them.
    expect(heldChunks(t.store)).toEqual([`${id}:1`, `${id}:2`, `${id}:3`]);
    await w.settle();
    expect([1, 2, 3].map((seq) => c.stored(id, seq))).toEqual([true, true, true]);
    // Every chunk went with the controller's acks of the resends: nothing lingers.
    expect(heldChunks(t.store)).toEqual([]);
  });

  it("lose nothing and linger nowhere when several tasks and a new link are involved", async () => {
    const t = setup();
    const c = realController(t.clock);
    const a = await c.runningTask();
    const b = await c.runningTask();
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ output: [chunk(a, 1), chunk(b, 1), chunk(a, 2)] });
    await flush();
    const w = c.link(t.core);
    await flush();
    w.up(); // all held back
    await flush();
    w.down();
    await flush();
    h.send(proof(h.link));
    await flush();
    h.send({ output: [chunk(a, 3), chunk(b, 2)] });
    await flush();
    w.up(); // the presence (a replay asked for), then a:3 and b:2: taken, acknowledged no further than the chunks held back
    await flush();
    w.down(); // the replay: px1 resends everything
    await flush();
    expect(c.stored(a, 3) && c.stored(b, 2)).toBe(true);
    const all = [`${a}:1`, `${b}:1`, `${a}:2`, `${a}:3`, `${b}:2`];
    expect(heldChunks(t.store)).toEqual(all);
    // The link drops before the resends are read; a new one replays everything, the host proves itself again.
    await w.cut();
    const w2 = c.link(t.core);
    await flush();
    w2.up();
    await flush();
    w2.down();
    await flush();
    h.send(proof(h.link));
    await w2.settle();
    expect(all.filter((k) => !c.stored(k.split(":")[0]!, Number(k.split(":")[1])))).toEqual([]);
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
