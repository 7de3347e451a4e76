import { describe, expect, it } from "vitest";
import type { UpwardItem } from "../../common/backlog.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { MemoryProxyStore } from "../../proxy/store.js";
import { chunk, flush, status, taskSpec } from "./support.js";
import { proxyHarness, statusAcksTo, upOutput, upStatuses } from "./proxy-harness.js";
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
});
