import { brotliCompressSync, gzipSync } from "node:zlib";
import { describe, expect, it } from "vitest";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { countingMessages as countedBody, gatedBody } from "../../common/counted-request.js";
import { countElements, decodeBounded, jsonElementsAtMost, MAX_MESSAGE_ELEMENTS } from "../../common/decode-budget.js";
import { MAX_MESSAGE_BYTES } from "../../common/coalescer.js";
import { RerunJobRequestSchema, SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
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

describe("counting what decodes to many values from few bytes: packed numbers, JSON", () => {
  it("counts a packed repeated number one element per value, as protobuf-es makes one array entry per value", () => {
    // RerunJobRequest.states (a packed enum): 3 values are 3 elements; 2 million one-byte values are over the budget.
    const three = toBinary(RerunJobRequestSchema, create(RerunJobRequestSchema, { jobId: "j1", states: [1, 2, 3] }));
    expect(countElements(RerunJobRequestSchema, three)).toBe(1 + 1 + 3);
    const values = Buffer.alloc(2_000_000, 1);
    const packed = Buffer.concat([Buffer.from([0x12]), varint(values.length), values]);
    expect(countElements(RerunJobRequestSchema, packed)).toBe(Infinity);
    expect(() => decodeBounded(RerunJobRequestSchema, packed)).toThrow(/refused before decoding/);
    // Multi-byte varints count once each.
    const wide = Buffer.concat([Buffer.from([0x12, 4]), Buffer.from([0x81, 0x01, 0x82, 0x01])]);
    expect(countElements(RerunJobRequestSchema, wide)).toBe(1 + 2);
  });

  it("bounds a JSON body's elements from above in one pass, strings and escapes skipped", () => {
    const honest = Buffer.from(JSON.stringify({ hostIds: ["a", "b"], steps: [{ exec: { argv: ["sh", "-c", 'echo "[1,2]:x" \\, ok'] } }] }));
    const n = jsonElementsAtMost(honest);
    // hostIds: 2 values, steps: 1, exec: 1, argv: 3, and their 4 keys: at least the 11 elements, not the string's brackets.
    expect(n).toBeGreaterThanOrEqual(11);
    expect(n).toBeLessThan(16);
    expect(jsonElementsAtMost(Buffer.from(`{"jobs":[${"{},".repeat(999_999)}{}]}`))).toBe(Infinity);
    expect(jsonElementsAtMost(Buffer.from(`{"a":"${",".repeat(2_000_000)}"}`))).toBe(1);
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

describe("counting a connect-es request body message by message (the controller's listeners)", () => {
  const countingMessages = (...args: Parameters<typeof countedBody>) => countedBody(...args).body;
  const envelope = (msg: Uint8Array, flags = 0) => {
    const head = Buffer.alloc(5);
    head[0] = flags;
    head.writeUInt32BE(msg.length, 1);
    return Buffer.concat([head, msg]);
  };
  async function* chunks(bytes: Buffer, size: number) {
    for (let i = 0; i < bytes.length; i += size) yield bytes.subarray(i, i + size);
  }
  const collect = async (body: AsyncIterable<Uint8Array>) => {
    const out: Uint8Array[] = [];
    for await (const c of body) out.push(c);
    return Buffer.concat(out);
  };
  const flood = () => {
    const b = Buffer.alloc(4 * 1024 * 1024);
    for (let i = 0; i < b.length; i += 2) b[i] = 0x1a; // ProxyStreamRequest.statuses = 3, empty: 2 million
    return b;
  };

  it("passes honest envelopes through byte for byte, however the body is cut", async () => {
    const m = toBinary(ProxyStreamRequestSchema, create(ProxyStreamRequestSchema, { statuses: [{ taskId: "t1" }, { taskId: "t2" }], ping: 7 }));
    const body = Buffer.concat([envelope(m), envelope(m), envelope(new Uint8Array(0))]);
    for (const size of [1, 3, 5, 7, 64, body.length]) {
      expect(Buffer.compare(await collect(countingMessages(chunks(body, size), ProxyStreamRequestSchema, "application/grpc")), body)).toBe(0);
    }
    // A unary Connect body is one raw message; JSON is left alone; an incomplete envelope is passed on for connect-es to report.
    expect(Buffer.compare(await collect(countingMessages(chunks(Buffer.from(m), 2), ProxyStreamRequestSchema, "application/proto")), Buffer.from(m))).toBe(0);
    const cut = envelope(m).subarray(0, 9);
    expect(Buffer.compare(await collect(countingMessages(chunks(cut, 4), ProxyStreamRequestSchema, "application/grpc")), cut)).toBe(0);
  });

  it("ends the body with INVALID_ARGUMENT at a message over the budget, before passing any of it on", async () => {
    const good = envelope(toBinary(ProxyStreamRequestSchema, create(ProxyStreamRequestSchema, { ping: 1 })));
    const body = Buffer.concat([good, envelope(flood())]);
    const seen: Uint8Array[] = [];
    const err = await (async () => {
      for await (const c of countingMessages(chunks(body, 65536), ProxyStreamRequestSchema, "application/grpc+proto")) seen.push(c);
    })().then(() => undefined, (e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(Code.InvalidArgument);
    expect(Buffer.compare(Buffer.concat(seen), good)).toBe(0);
    await expect(collect(countingMessages(chunks(flood(), 65536), ProxyStreamRequestSchema, "application/proto"))).rejects.toThrow(/refused before decoding/);
    // JSON is counted too, in every framing: an honest body passes as it came, a flood of elements does not.
    const json = Buffer.from('{"ping":7}');
    expect(Buffer.compare(await collect(countingMessages(chunks(json, 1), ProxyStreamRequestSchema, "application/json")), json)).toBe(0);
    const jsonFlood = Buffer.from(`{"statuses":[${"{},".repeat(1_000_000)}{}]}`);
    for (const [type, b] of [["application/json", jsonFlood], ["application/connect+json", envelope(jsonFlood)], ["application/grpc+json", envelope(jsonFlood)], ["application/grpc-web+json", envelope(jsonFlood)]] as const) {
      await expect(collect(countingMessages(chunks(b, 65536), ProxyStreamRequestSchema, type)), type).rejects.toThrow(/refused before decoding/);
    }
  });

  it("inflates a compressed message to count it, passes an honest one on inflated, and refuses a bomb of elements or bytes", async () => {
    const honest = toBinary(ProxyStreamRequestSchema, create(ProxyStreamRequestSchema, { statuses: [{ taskId: "t1" }], ping: 7 }));
    for (const [name, squeeze] of [["gzip", gzipSync], ["br", brotliCompressSync]] as const) {
      // Inflated once, here: the envelope goes on with its compressed flag cleared, a unary body without its encoding.
      const good = envelope(squeeze(honest), 1);
      expect(Buffer.compare(await collect(countingMessages(chunks(good, 3), ProxyStreamRequestSchema, "application/grpc", name)), envelope(honest))).toBe(0);
      const unary = countedBody(chunks(squeeze(honest), 3), ProxyStreamRequestSchema, "application/proto", name);
      expect(unary.inflatesUnary).toBe(true);
      expect(Buffer.compare(await collect(unary.body), Buffer.from(honest))).toBe(0);
      const jsonBomb = squeeze(Buffer.from(`{"statuses":[${"{},".repeat(2_000_000)}{}]}`));
      await expect(collect(countingMessages(chunks(jsonBomb, 65536), ProxyStreamRequestSchema, "application/json", name)), `${name} json`).rejects.toThrow(/refused before decoding/);
      // A few KiB that inflate to 2 million empty statuses: in an envelope (gRPC, Connect streaming) or as a unary Connect body.
      const bomb = squeeze(flood());
      expect(bomb.length).toBeLessThan(64 * 1024);
      for (const [type, body] of [["application/grpc", envelope(bomb, 1)], ["application/connect+proto", envelope(bomb, 1)], ["application/proto", bomb]] as const) {
        await expect(collect(countingMessages(chunks(body, 65536), ProxyStreamRequestSchema, type, name)), `${name} ${type}`).rejects.toThrow(/refused before decoding/);
      }
      // More bytes than a message may have once inflated: refused as connect-es refuses it.
      const big = envelope(squeeze(Buffer.alloc(17 * 1024 * 1024)), 1);
      const err = await collect(countingMessages(chunks(big, 65536), ProxyStreamRequestSchema, "application/grpc", name)).then(() => undefined, (e: unknown) => e);
      expect(ConnectError.from(err).code, name).toBe(Code.ResourceExhausted);
    }
    // Bytes that are not the gzip they claim to be: INVALID_ARGUMENT. An encoding connect-es does not take is left to it.
    const notGzip = envelope(Buffer.from("not gzip at all"), 1);
    const err = await collect(countingMessages(chunks(notGzip, 4), ProxyStreamRequestSchema, "application/grpc", "gzip")).then(() => undefined, (e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(Code.InvalidArgument);
    const unknown = envelope(Buffer.from("whatever"), 1);
    expect(Buffer.compare(await collect(countingMessages(chunks(unknown, 4), ProxyStreamRequestSchema, "application/grpc", "snappy")), unknown)).toBe(0);
  });

  /** A body that counts how many chunks were read from it, and fails the test if read past `limit`. */
  const metered = (first: Uint8Array[], filler: Uint8Array, limit: number) => {
    const meter = { reads: 0 };
    const body = (async function* () {
      for (const c of first) {
        meter.reads++;
        yield c;
      }
      for (;;) {
        if (++meter.reads > limit) throw new Error(`read ${limit} chunks: the counter held on to a message it should have refused`);
        yield filler;
      }
    })();
    return { body, meter };
  };

  it("refuses a message longer than the size limit as soon as that is known, without holding it", async () => {
    const filler = Buffer.alloc(64 * 1024);
    // An envelope declaring ~4 GiB: refused on its 5-byte header.
    const head = Buffer.from([0, 0xff, 0xff, 0xff, 0xf0]);
    for (const type of ["application/grpc", "application/connect+proto", "application/grpc-web+json"]) {
      const { body, meter } = metered([head], filler, 1000);
      const err = await collect(countingMessages(body, ProxyStreamRequestSchema, type)).then(() => undefined, (e: unknown) => e);
      expect(ConnectError.from(err).code, type).toBe(Code.ResourceExhausted);
      expect(meter.reads, type).toBeLessThanOrEqual(2);
    }
    // A unary body: refused once past the limit, not at its end.
    const { body, meter } = metered([], filler, 1000);
    const err = await collect(countingMessages(body, ProxyStreamRequestSchema, "application/proto")).then(() => undefined, (e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(Code.ResourceExhausted);
    expect(meter.reads).toBe(Math.floor(MAX_MESSAGE_BYTES / filler.length) + 1);
  });

  it("reads a body cut into single bytes in time linear in its length (a header split across chunks is not joined again per chunk)", async () => {
    // 256 KiB of honest statuses in 1-byte chunks: joining everything held for every chunk copied ~34 GB.
    const m = toBinary(ProxyStreamRequestSchema, create(ProxyStreamRequestSchema, { statuses: Array.from({ length: 20_000 }, (_, i) => ({ taskId: `t${i}` })) }));
    const body = Buffer.concat([envelope(m), envelope(m)]);
    expect(body.length).toBeGreaterThan(256 * 1024);
    expect(Buffer.compare(await collect(countingMessages(chunks(body, 1), ProxyStreamRequestSchema, "application/grpc")), body)).toBe(0);
  }, 60_000);

  it("runs the gate before reading any of the body, and reads nothing when it refuses", async () => {
    const { body, meter } = metered([], Buffer.alloc(16), 10);
    const refusal = new ConnectError("a host certificate cannot be used here", Code.PermissionDenied);
    const counted = countedBody(gatedBody(body, () => Promise.reject(refusal)), SubmitJobRequestSchema, "application/proto").body;
    await expect(collect(counted)).rejects.toBe(refusal);
    expect(meter.reads).toBe(0);
    // Content types the counter leaves alone pass the gate too.
    const other = countedBody(gatedBody(metered([], Buffer.alloc(16), 10).body, () => Promise.reject(refusal)), SubmitJobRequestSchema, "text/plain").body;
    await expect(collect(other)).rejects.toBe(refusal);
  });
});
