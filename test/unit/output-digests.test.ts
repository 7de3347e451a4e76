import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { OutputDigests } from "../../controller/output-digests.js";

const sha = (...parts: Uint8Array[]) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("hex");
};
const hex = (b: Uint8Array | undefined) => (b ? Buffer.from(b).toString("hex") : undefined);
const bytes = (...v: number[]) => Uint8Array.from(v);

describe("OutputDigests", () => {
  it("hashes chunks stored in seq order from 1, every byte value included", () => {
    const d = new OutputDigests();
    const all = Uint8Array.from({ length: 256 }, (_, i) => i);
    d.stored("t", 1, all);
    d.stored("t", 2, bytes(0xc3, 0x28));
    const got = d.take("t", 2);
    expect(hex(got?.sha256)).toBe(sha(all, bytes(0xc3, 0x28)));
    expect(got?.bytes).toBe(258);
    expect(d.size).toBe(0);
  });

  it("gives nothing (the store is read instead) when chunks came out of order, did not start at 1, or the count differs", () => {
    const d = new OutputDigests();
    d.stored("a", 1, bytes(1));
    d.stored("a", 3, bytes(3));
    d.stored("a", 2, bytes(2));
    expect(d.take("a", 3)).toBeUndefined();
    d.stored("b", 2, bytes(2));
    expect(d.take("b", 2)).toBeUndefined();
    d.stored("c", 1, bytes(1));
    d.stored("c", 2, bytes(2));
    expect(d.take("c", 1)).toBeUndefined();
  });

  it("follows at most maxTasks tasks, letting the oldest go", () => {
    const d = new OutputDigests(2);
    d.stored("a", 1, bytes(1));
    d.stored("b", 1, bytes(2));
    d.stored("c", 1, bytes(3));
    expect(d.size).toBe(2);
    expect(d.take("a", 1)).toBeUndefined();
    expect(hex(d.take("c", 1)?.sha256)).toBe(sha(bytes(3)));
  });

  it("forgets a task whose output will not be checked, so it pushes no other task out", () => {
    const d = new OutputDigests(2);
    d.stored("a", 1, bytes(1));
    d.stored("b", 1, bytes(2));
    d.forget("a");
    d.stored("c", 1, bytes(3));
    expect(d.size).toBe(2);
    expect(hex(d.take("b", 1)?.sha256)).toBe(sha(bytes(2)));
    expect(d.take("a", 1)).toBeUndefined();
  });
});
