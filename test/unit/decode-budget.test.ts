import { describe, expect, it } from "vitest";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { countElements, decodeBounded, MAX_MESSAGE_ELEMENTS } from "../../common/decode-budget.js";
import { AgentStreamResponseSchema, AgentStreamRequestSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { TaskSigningKeySchema } from "../../gen/rexmesh/v1/task_pb.js";
import { testSigning, taskSpec } from "./support.js";

describe("decoding a peer's message within an element budget", () => {
  it("counts what an honest frame holds, nested messages and maps included, and decodes it as fromBinary does", () => {
    const { signer } = testSigning();
    const tasks = signer.signAll(Array.from({ length: 1000 }, (_, i) => taskSpec(`t${i}`, `h${i}`)));
    const frame = create(AgentStreamResponseSchema, { tasks, cancelTaskIds: ["a", "b"], outputAcks: [{ taskId: "x", seq: 3n }], signingKeys: [signer.key] });
    const bytes = toBinary(AgentStreamResponseSchema, frame);
    const n = countElements(AgentStreamResponseSchema, bytes);
    // Per task: the SignedTask, its spec, signature and key id, its batch proof with what is set of it (index 0 is not
    // encoded), its salt and every path hash; then 2 cancel ids, an ack with its 2 fields, and the key with its fields.
    const proof = (t: (typeof tasks)[number]) => 1 + (t.batch!.index ? 1 : 0) + 1 + 1 + t.batch!.path.length;
    const key = 1 + countElements(TaskSigningKeySchema, toBinary(TaskSigningKeySchema, signer.key));
    expect(n).toBe(tasks.reduce((a, t) => a + 4 + proof(t), 0) + 2 + 3 + key);
    expect(toBinary(AgentStreamResponseSchema, decodeBounded(AgentStreamResponseSchema, bytes))).toEqual(bytes);
    // A map with message values (host facts' labels are strings; the hello's facts is a message): counted inside.
    const hello = toBinary(AgentStreamRequestSchema, create(AgentStreamRequestSchema, { hello: { hostId: "h1", facts: { os: "linux", tools: ["exec", "shell"] } }, credits: 4 }));
    expect(countElements(AgentStreamRequestSchema, hello)).toBe(1 + 1 + 1 + 1 + 2 + 1);
  });

  it("refuses, before making any object, a frame of millions of empty tasks or of one task with millions of path hashes", () => {
    // 15 MiB of empty SignedTask entries (tag 0x12, length 0): 7.8 million tasks.
    const flood = Buffer.alloc(15 * 1024 * 1024);
    for (let i = 0; i < flood.length; i += 2) flood[i] = 0x12;
    const t0 = performance.now();
    expect(countElements(AgentStreamResponseSchema, flood)).toBe(Infinity);
    expect(() => decodeBounded(AgentStreamResponseSchema, flood)).toThrow(/more than 1000000 elements: refused before decoding/);
    expect(performance.now() - t0).toBeLessThan(5000);
    // One task whose batch proof holds 2 million empty hashes: nested, counted all the same.
    const path = Buffer.alloc(2_000_000 * 2);
    for (let i = 0; i < path.length; i += 2) path[i] = 0x1a; // TaskBatchProof.path = 3
    const proof = Buffer.concat([Buffer.from([0x22]), varint(path.length), path]); // SignedTask.batch = 4
    const task = Buffer.concat([Buffer.from([0x12]), varint(proof.length), proof]); // AgentStreamResponse.tasks = 2
    expect(countElements(AgentStreamResponseSchema, task)).toBe(Infinity);
  });

  it("takes a message of exactly the budget, and leaves malformed bytes to decoding to refuse", () => {
    const ids = Array.from({ length: 999 }, (_, i) => `t${i}`);
    const bytes = toBinary(ProxyStreamRequestSchema, create(ProxyStreamRequestSchema, { statuses: ids.map((taskId) => ({ taskId })) }));
    expect(countElements(ProxyStreamRequestSchema, bytes, 2 * 999)).toBe(2 * 999);
    expect(countElements(ProxyStreamRequestSchema, bytes, 2 * 999 - 1)).toBe(Infinity);
    const truncated = bytes.subarray(0, bytes.length - 3);
    expect(countElements(ProxyStreamRequestSchema, truncated)).toBeLessThan(MAX_MESSAGE_ELEMENTS);
    expect(() => decodeBounded(ProxyStreamRequestSchema, truncated)).toThrow();
    expect(() => fromBinary(ProxyStreamRequestSchema, truncated)).toThrow();
  });
});

function varint(n: number): Buffer {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return Buffer.from(out);
}
