import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { OutputCoalescer, type FlushScheduler } from "../../daemon/output-coalescer.js";
import { OutputStream } from "../../gen/rexmesh/v1/task_pb.js";

const sha256 = (parts: readonly Uint8Array[]) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("hex");
};

/** A scheduler driven by hand: `fire()` runs the armed flush, if any. */
class ManualScheduler {
  private armed: { fn: () => void; ms: number } | undefined;
  readonly schedule: FlushScheduler = (fn, ms) => {
    const me = { fn, ms };
    this.armed = me;
    return () => {
      if (this.armed === me) this.armed = undefined;
    };
  };
  get pending(): boolean {
    return this.armed !== undefined;
  }
  get delay(): number | undefined {
    return this.armed?.ms;
  }
  fire(): void {
    const a = this.armed;
    this.armed = undefined;
    a?.fn();
  }
}

/** xorshift32: a known pseudo-random sequence from a seed. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

function collect() {
  const chunks: { stream: OutputStream; data: Uint8Array }[] = [];
  return { chunks, emit: (stream: OutputStream, data: Uint8Array) => chunks.push({ stream, data }) };
}

describe("OutputCoalescer", () => {
  it("gathers reads of one stream into chunks of maxBytes and keeps the rest until the delay", () => {
    const s = new ManualScheduler();
    const out = collect();
    const c = new OutputCoalescer(out.emit, { maxBytes: 100, delayMs: 5, schedule: s.schedule });
    for (let i = 0; i < 7; i++) c.add(OutputStream.STDOUT, new Uint8Array(30).fill(i));
    // 210 bytes: two full chunks out, 10 bytes wait for the timer.
    expect(out.chunks.map((x) => x.data.length)).toEqual([100, 100]);
    expect(c.pending).toBe(10);
    expect(s.delay).toBe(5);
    s.fire();
    expect(out.chunks.map((x) => x.data.length)).toEqual([100, 100, 10]);
    expect(c.pending).toBe(0);
    expect(s.pending).toBe(false);
  });

  it("sends what is gathered when the other stream speaks, so chunk order is read order", () => {
    const s = new ManualScheduler();
    const out = collect();
    const c = new OutputCoalescer(out.emit, { maxBytes: 1000, delayMs: 5, schedule: s.schedule });
    c.add(OutputStream.STDOUT, Buffer.from("a1"));
    c.add(OutputStream.STDOUT, Buffer.from("a2"));
    c.add(OutputStream.STDERR, Buffer.from("e1"));
    c.add(OutputStream.STDOUT, Buffer.from("a3"));
    c.flush();
    expect(out.chunks.map((x) => [x.stream, Buffer.from(x.data).toString()])).toEqual([
      [OutputStream.STDOUT, "a1a2"],
      [OutputStream.STDERR, "e1"],
      [OutputStream.STDOUT, "a3"],
    ]);
  });

  it("passes a lone read on without copying it", () => {
    const out = collect();
    const c = new OutputCoalescer(out.emit, { maxBytes: 1000, delayMs: 5, schedule: new ManualScheduler().schedule });
    const read = Buffer.from("only");
    c.add(OutputStream.STDOUT, read);
    c.flush();
    expect(out.chunks[0]!.data).toBe(read);
  });

  it("keeps every byte value and invalid UTF-8 as it is", () => {
    const out = collect();
    const c = new OutputCoalescer(out.emit, { maxBytes: 100, delayMs: 5, schedule: new ManualScheduler().schedule });
    const all = Uint8Array.from({ length: 256 }, (_, i) => i);
    const invalid = Uint8Array.from([0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1, 0xf0, 0x90, 0x28, 0xbc, 0xff, 0xfe, 0x00]);
    c.add(OutputStream.STDOUT, all.subarray(0, 77));
    c.add(OutputStream.STDOUT, invalid);
    c.add(OutputStream.STDOUT, all.subarray(77));
    c.flush();
    expect(sha256(out.chunks.map((x) => x.data))).toBe(sha256([all.subarray(0, 77), invalid, all.subarray(77)]));
    expect(out.chunks.every((x) => x.data.length <= 100)).toBe(true);
  });

  it("several MB of interleaved stdout/stderr in irregular reads and timings come out identical per stream", () => {
    const s = new ManualScheduler();
    const out = collect();
    const max = 256 * 1024;
    const c = new OutputCoalescer(out.emit, { maxBytes: max, delayMs: 5, schedule: s.schedule });
    const next = rng(0x5eed);
    const written: Record<number, Uint8Array[]> = { [OutputStream.STDOUT]: [], [OutputStream.STDERR]: [] };
    let total = 0;
    while (total < 6 * 1024 * 1024) {
      const stream = next() % 5 === 0 ? OutputStream.STDERR : OutputStream.STDOUT;
      // Reads of 1 byte to 64 KiB, skewed small, like a pipe's.
      const size = 1 + (next() % (next() % 3 === 0 ? 65536 : 512));
      const read = Buffer.allocUnsafe(size);
      for (let i = 0; i < size; i++) read[i] = next() & 0xff;
      written[stream]!.push(Buffer.from(read));
      c.add(stream, read);
      total += size;
      // The timer fires now and then between reads.
      if (next() % 7 === 0) s.fire();
    }
    c.flush();
    for (const stream of [OutputStream.STDOUT, OutputStream.STDERR]) {
      expect(sha256(out.chunks.filter((x) => x.stream === stream).map((x) => x.data))).toBe(sha256(written[stream]!));
    }
    expect(out.chunks.every((x) => x.data.length > 0 && x.data.length <= max)).toBe(true);
    // Far fewer chunks than reads, and the bytes add up.
    expect(out.chunks.reduce((n, x) => n + x.data.length, 0)).toBe(total);
  });

  it("emits a chunk gathered from several reads as a new buffer that the reads' buffers do not alias", () => {
    const out = collect();
    const c = new OutputCoalescer(out.emit, { maxBytes: 8, delayMs: 5, schedule: new ManualScheduler().schedule });
    const a = Buffer.from("abcd");
    const b = Buffer.from("efghij");
    c.add(OutputStream.STDOUT, a);
    c.add(OutputStream.STDOUT, b);
    a.fill(0);
    b.fill(0);
    expect(Buffer.from(out.chunks[0]!.data).toString("latin1")).toBe("abcdefgh");
  });
});
