import { createHash } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { encodeOutputChunk, outputAsWireFor, rememberWire, wireBodyOffset, wireOf } from "../../common/output-wire.js";
import { decodeItem, LmdbBacklog } from "../../common/lmdb-backlog.js";
import { AgentStreamRequestSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { WatchJobResponseSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputChunkSchema, OutputStream, TaskState, type OutputChunk } from "../../gen/rexmesh/v1/task_pb.js";

const hex = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
const allBytes = Uint8Array.from({ length: 256 }, (_, i) => i);

function chunk(init: Partial<OutputChunk>): OutputChunk {
  return create(OutputChunkSchema, { taskId: "t1", seq: 1n, stream: OutputStream.STDOUT, data: allBytes, hostId: "h1", ...init });
}

/** What protobuf-es makes of the chunk as an element of a repeated field: its length, then the message. */
function reference(c: OutputChunk): Uint8Array {
  const body = toBinary(OutputChunkSchema, c);
  const lenOnly = toBinary(OutputChunkSchema, create(OutputChunkSchema, { data: body })); // tag 0x22, varint len, body
  return lenOnly.subarray(1);
}

describe("output chunks in their wire form", () => {
  it("encodes byte for byte as protobuf-es does, defaults left out, any data", () => {
    const cases: OutputChunk[] = [
      chunk({}),
      chunk({ data: new Uint8Array(0) }),
      chunk({ seq: 0n, stream: OutputStream.UNSPECIFIED, hostId: "" }),
      chunk({ taskId: "tâsk-ünïcode-✓", hostId: "hôst" }),
      chunk({ seq: BigInt(Number.MAX_SAFE_INTEGER), stream: OutputStream.STDERR }),
      chunk({ data: Uint8Array.from([0xc3, 0x28, 0xff, 0xfe, 0x00, 0xed, 0xa0, 0x80]) }),
      chunk({ data: new Uint8Array(300_000).map((_, i) => (i * 7919) & 0xff), seq: 16_384n }),
    ];
    for (const c of cases) {
      expect(hex(encodeOutputChunk(c))).toBe(hex(reference(c)));
      const lead = encodeOutputChunk(c, 3);
      expect(hex(lead.subarray(3))).toBe(hex(reference(c)));
    }
  });

  it("a frame with chunks in wire form decodes to the same frame, chunks in order, for every message that carries output", () => {
    const chunks = [chunk({ seq: 1n }), chunk({ seq: 2n, stream: OutputStream.STDERR, data: Uint8Array.from([0xff, 0x00, 0x80]) }), chunk({ seq: 3n, data: new Uint8Array(0) })];
    const agent = create(AgentStreamRequestSchema, { output: chunks, statuses: [{ taskId: "t1", state: TaskState.RUNNING }], credits: 3 });
    const proxy = create(ProxyStreamRequestSchema, { output: chunks, statuses: [{ taskId: "t1", state: TaskState.RUNNING }] });
    const watch = create(WatchJobResponseSchema, { output: chunks });
    const pairs = [
      [AgentStreamRequestSchema, agent],
      [ProxyStreamRequestSchema, proxy],
      [WatchJobResponseSchema, watch],
    ] as const;
    for (const [schema, msg] of pairs) {
      const prepare = outputAsWireFor(schema)!;
      const wire = toBinary(schema, prepare(msg));
      const back = fromBinary(schema, wire);
      // The output list goes last on the wire; read back, the frame encodes as the original does.
      expect(hex(toBinary(schema, back))).toBe(hex(toBinary(schema, msg)));
      if (!("output" in back)) throw new Error("no output list");
      expect(back.output.map((c) => [c.seq, c.stream, hex(c.data)])).toEqual(chunks.map((c) => [c.seq, c.stream, hex(c.data)]));
    }
    expect(agent.output).toHaveLength(3); // the message sent is not changed
  });

  it("uses a remembered wire form only while the chunk is unchanged", () => {
    const c = chunk({});
    const marker = encodeOutputChunk(chunk({ taskId: "remembered" }));
    rememberWire(c, marker);
    expect(wireOf(c)).toBe(marker);
    c.hostId = "stamped-by-proxy";
    expect(hex(wireOf(c))).toBe(hex(reference(c)));
  });

  it("a backlog reads chunks it stored in either form, and an earlier version reads the new form as the same chunk", async () => {
    const c = chunk({ seq: 7n, stream: OutputStream.STDERR, data: allBytes });
    const bare = toBinary(OutputChunkSchema, c);
    const old = new Uint8Array(bare.length + 1);
    old[0] = 2;
    old.set(bare, 1);
    // The new form, as the backlog writes it: kind byte, varint field 15 (the length), then the chunk.
    const backlog = new LmdbBacklog(memoryDb(), "");
    await backlog.push([{ kind: "output", chunk: c }]);
    expect(lastPut).toBeDefined();
    const fresh = lastPut!;
    expect(fresh[0]).toBe(2);
    expect(hex(fresh.subarray(2))).toBe(hex(reference(c)));
    const same = (x: OutputChunk) => [x.taskId, x.seq, x.stream, x.hostId, hex(x.data)];
    for (const form of [old, fresh]) {
      const item = decodeItem(form);
      if (item.kind !== "output") throw new Error("not output");
      expect(same(item.chunk)).toEqual(["t1", 7n, OutputStream.STDERR, "h1", hex(allBytes)]);
    }
    // What an earlier version does with the new form: a bare chunk with one unknown field.
    expect(same(fromBinary(OutputChunkSchema, fresh.subarray(1)))).toEqual(same(c));
    // The new form goes up as stored.
    const item = decodeItem(fresh);
    if (item.kind === "output") expect(wireOf(item.chunk)).toEqual(fresh.subarray(2));
    expect(wireBodyOffset(fresh.subarray(2))).toBe(fresh.length - 2 - bare.length);
  });
});

/** The value the last put of {@link memoryDb} wrote. */
let lastPut: Uint8Array | undefined;

/** Just enough of an lmdb Database for a backlog's writes. */
function memoryDb() {
  return {
    getRange: () => [],
    put: (_key: unknown, value: Uint8Array) => {
      lastPut = value;
      return Promise.resolve(true);
    },
    remove: () => Promise.resolve(true),
  } as unknown as ConstructorParameters<typeof LmdbBacklog>[0];
}
