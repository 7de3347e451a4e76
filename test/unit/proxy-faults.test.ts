import { describe, expect, it } from "vitest";
import type { UpwardItem } from "../../common/backlog.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { MemoryProxyStore } from "../../proxy/store.js";
import { chunk, flush, status, taskSpec } from "./support.js";
import { handed, proxyHarness, statusAcksTo, upOutput, upStatuses } from "./proxy-harness.js";
import { nonceSentTo, realController } from "./real-controller.js";

class FlakyStore extends MemoryProxyStore {
  failNext = false;
  override pushUpward(items: readonly UpwardItem[]): Promise<void> {
    if (this.failNext) {
      this.failNext = false;
      return Promise.reject(Object.assign(new Error("No space left on device"), { code: "ENOSPC" }));
    }
    return super.pushUpward(items);
  }
}

function setup() {
  return proxyHarness(new FlakyStore());
}

/** A store whose upward writes wait, while `held`, until the test lets each one commit or fail. */
class GatedStore extends MemoryProxyStore {
  held = false;
  readonly waiting: { commit: () => void; fail: () => void }[] = [];
  override pushUpward(items: readonly UpwardItem[]): Promise<void> {
    if (!this.held) return super.pushUpward(items);
    return new Promise((resolve, reject) =>
      this.waiting.push({
        commit: () => resolve(super.pushUpward(items)),
        fail: () => reject(Object.assign(new Error("No space left on device"), { code: "ENOSPC" })),
      }),
    );
  }
}

describe("proxy under faults", () => {
  it("P1 a host's end whose store write failed is never acknowledged to the host without being kept", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    const a = t.connectHost("h1", 1);
    await flush();
    a.send({ statuses: [status("t1", TaskState.RUNNING)] });
    await flush();
    t.store.failNext = true; // ENOSPC on the frame carrying the end
    a.send({ statuses: [status("t1", TaskState.SUCCEEDED, { exitCode: 0 })] });
    await flush();
    expect(await a.settled).toBeInstanceOf(Error); // the stream fails; nothing acked yet: fine so far
    // The daemon reconnects and resends its outbox.
    const b = t.connectHost("h1", 1);
    await flush();
    b.send({ statuses: [status("t1", TaskState.SUCCEEDED, { exitCode: 0 })] });
    await flush();
    const acked = statusAcksTo(b.link).includes("t1:SUCCEEDED"); // the daemon now forgets the end
    const kept = t.store.upward().some((i) => i.kind === "status" && i.status.taskId === "t1" && i.status.state === TaskState.SUCCEEDED);
    expect(acked).toBe(true);
    expect(upStatuses(ctl.link)).toContain("t1:SUCCEEDED");
    expect(kept).toBe(true);
  });

  it("P2 a replay the controller asks for resends held-back chunks even when a later chunk is taken first", async () => {
    const t = setup();
    const c = realController(t.clock);
    const id = await c.runningTask();
    const h = t.connectHost("h1", 0);
    await flush();
    // h1 brought the task from another proxy (pxA); its chunk 1 is in px1's backlog.
    h.send({ output: [chunk(id, 1, "one")] });
    await flush();
    const w = c.link(t.core);
    await flush();
    expect(upOutput(w.proxySide)).toEqual([`${id}:1`]); // replayed before the welcome: the controller holds it back
    w.up();
    await flush();
    w.down(); // the welcome
    await flush();
    h.send({ presenceNonce: nonceSentTo(h.link), presenceProof: new Uint8Array([1]), presenceSalt: new Uint8Array([2]), output: [chunk(id, 2, "two")] });
    await flush();
    expect(upOutput(w.proxySide)).toEqual([`${id}:1`, `${id}:2`]);
    // The link is backed up (a long backlog after a cut): the pump waits for it to drain.
    w.proxySide.backlog = 10;
    h.send({ output: [chunk(id, 3, "three")] });
    await flush();
    // The controller: presence accepted -> replay; chunk 2 (sent after the presence) taken and acknowledged (cumulatively).
    w.up();
    await flush();
    w.down();
    await flush();
    expect(c.stored(id, 2)).toBe(true);
    w.proxySide.drain();
    await flush();
    const afterReplay = upOutput(w.proxySide).slice(2);
    expect(afterReplay).toContain(`${id}:1`);
    await w.settle();
    expect([1, 2, 3].map((seq) => c.stored(id, seq))).toEqual([true, true, true]);
    expect(t.store.upward().filter((i) => i.kind === "output")).toEqual([]);
  });

  it("a cancel of a task the proxy never had reaches its host when the host is connected here (it failed over with the task running)", async () => {
    const t = setup();
    const ctl = t.connectController();
    await flush();
    const h = t.connectHost("h1", 1);
    await flush();
    ctl.send({ cancels: [{ taskId: "t9", hostId: "h1", withdraw: false }, { taskId: "t8", hostId: "h2", withdraw: false }] });
    await flush();
    expect(h.link.sent.flatMap((f) => f.cancelTaskIds)).toEqual(["t9"]);
    expect(upStatuses(ctl.link)).toEqual(expect.arrayContaining(["t9:CANCELLED", "t8:CANCELLED"]));
  });

  it("P3 a task whose hand-over is not yet stored is not sent on a host's new stream before it is; it goes there once stored", async () => {
    const t = proxyHarness(new GatedStore());
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    t.store.held = true;
    const a = t.connectHost("h1", 1);
    await flush();
    expect(t.store.waiting).toHaveLength(1); // DISPATCHED on its way to the store
    a.link.end();
    await flush();
    const b = t.connectHost("h1", 1);
    await flush();
    // Sent now, a crash before the write lands would leave the task QUEUED here while the host runs it.
    expect(handed(a.link)).toEqual([]);
    expect(handed(b.link)).toEqual([]);
    t.store.waiting.shift()!.commit();
    await flush();
    expect(handed(b.link)).toEqual(["t1"]);
  });

  it("P4 a hand-over whose write failed is tried again without waiting for the host to report, and gives back only credits the host did not report again meanwhile", async () => {
    const t = proxyHarness(new GatedStore(), { sweepMs: 1000 });
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() }), taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    await flush();
    t.store.held = true;
    const a = t.connectHost("h1", 1);
    await flush();
    expect(t.store.waiting).toHaveLength(1); // t1's hand-over
    // The daemon reports one free slot again (its credits are absolute): t2 takes it.
    a.send({ credits: 1 });
    await flush();
    expect(t.store.waiting).toHaveLength(2);
    t.store.held = false;
    t.store.waiting.shift()!.fail(); // t1's write: ENOSPC
    t.store.waiting.shift()!.commit(); // t2's
    await flush();
    expect(handed(a.link)).toEqual(["t2"]);
    // The slot t1 took was reported again since: t1 waits for the next free one, it does not make a second task run.
    t.clock.advance(1000);
    await flush();
    expect(handed(a.link)).toEqual(["t2"]);
    // A slot frees and is reported; a failed hand-over is also retried by the sweep when the host stays silent.
    a.send({ credits: 1 });
    await flush();
    expect(handed(a.link)).toEqual(["t2", "t1"]);

    const u = proxyHarness(new GatedStore(), { sweepMs: 1000 });
    const ctl2 = u.connectController();
    ctl2.send({ tasks: [taskSpec("t3", "h2", { deliverByMs: u.future() })] });
    await flush();
    u.store.held = true;
    const h = u.connectHost("h2", 1);
    await flush();
    u.store.held = false;
    u.store.waiting.shift()!.fail();
    await flush();
    expect(handed(h.link)).toEqual([]);
    u.clock.advance(1000);
    await flush();
    expect(handed(h.link)).toEqual(["t3"]);
  });

  it("P5 a controller frame whose commit failed leaves nothing in memory the store lacks: the task sent again is taken as new and kept", async () => {
    const t = setup();
    const a = t.connectController();
    await flush();
    t.store.failNext = true; // ENOSPC on the frame's commit
    a.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    expect(await a.settled).toBeInstanceOf(Error); // the link fails: the controller sends the task again
    expect(t.store.getTask("t1")).toBeUndefined();
    const b = t.connectController();
    await flush();
    b.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    // Taken as new: its QUEUED is stored, where a record left in memory took the resend for a reminder and kept nothing.
    const kept = t.store.upward().some((i) => i.kind === "status" && i.status.taskId === "t1" && i.status.state === TaskState.QUEUED);
    expect(kept).toBe(true);
    expect(t.store.getTask("t1")?.state).toBe(TaskState.QUEUED);
  });

  it("P5 a task cancelled before it came, whose arrival's commit failed, is still cancelled when the controller sends it again", async () => {
    const t = setup();
    const a = t.connectController();
    await flush();
    a.send({ cancels: [{ taskId: "t1", hostId: "h1", withdraw: false }] });
    await flush();
    t.store.failNext = true;
    a.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    expect(await a.settled).toBeInstanceOf(Error);
    const b = t.connectController();
    await flush();
    b.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    // Its mark went only with a stored cancelled copy: the resend is cancelled again, never queued for the host.
    expect(t.store.getTask("t1")?.state).toBe(TaskState.CANCELLED);
    expect(upStatuses(b.link)).toContain("t1:CANCELLED");
    expect(upStatuses(b.link)).not.toContain("t1:QUEUED");
  });
});

