import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { describe, expect, it } from "vitest";
import { AsyncQueue } from "../../common/async-queue.js";
import { untilClosed } from "../../common/frame-link.js";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

/** Collects garbage outside the current job, so that WeakRefs to dead objects are cleared. */
async function collect(): Promise<void> {
  for (let i = 0; i < 3; i++) {
    await new Promise((r) => setTimeout(r, 0));
    gc();
  }
}

const frame = () => ({ bytes: new Uint8Array(64 * 1024) });

describe("links keep no frame they have passed on", () => {
  it("untilClosed: frames read while the link stays open can be collected", async () => {
    const refs: WeakRef<object>[] = [];
    async function* source() {
      for (let i = 0; i < 50; i++) {
        const f = frame();
        refs.push(new WeakRef(f));
        yield f;
      }
    }
    const never = new Promise<void>(() => {}); // the link is still open
    let n = 0;
    for await (const f of untilClosed(source(), never)) {
      void f;
      n++;
    }
    expect(n).toBe(50);
    await collect();
    expect(refs.filter((r) => r.deref() !== undefined).length).toBeLessThanOrEqual(1);
  });

  it("untilClosed still ends the iteration when the link closes while it waits", async () => {
    let close!: () => void;
    const closed = new Promise<void>((r) => (close = r));
    async function* silent() {
      yield frame();
      await new Promise(() => {}); // the peer goes silent
    }
    const it = untilClosed(silent(), closed)[Symbol.asyncIterator]();
    expect((await it.next()).done).toBe(false);
    const waiting = it.next();
    close();
    expect((await waiting).done).toBe(true);
    expect((await it.next()).done).toBe(true);
  });

  it("AsyncQueue: items taken out can be collected before the queue compacts", async () => {
    const q = new AsyncQueue<object>();
    const refs: WeakRef<object>[] = [];
    for (let i = 0; i < 50; i++) {
      const f = frame();
      refs.push(new WeakRef(f));
      q.push(f);
    }
    for (let i = 0; i < 50; i++) await q.next();
    await collect();
    expect(refs.filter((r) => r.deref() !== undefined).length).toBeLessThanOrEqual(1);
  });
});
