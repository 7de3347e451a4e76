import { create, equals, fromBinary, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { encodeSignedTask, tasksAsWire } from "../../controller/signed-task-wire.js";
import { CancelTaskSchema, ProxyStreamResponseSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedTaskSchema, TaskBatchProofSchema, type SignedTask } from "../../gen/rexmesh/v1/task_pb.js";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

/** What protobuf-es makes of the task as an element of a repeated field: its length, then the message. */
function reference(t: SignedTask): Uint8Array {
  return new BinaryWriter().bytes(toBinary(SignedTaskSchema, t)).finish();
}

const KEY_IDS = ["", "x0123456789abcdef0123456789abcdef", "0123456789abcdef", "ключ-✓", "k".repeat(130)];
const SIZES = [0, 1, 16, 32, 64, 127, 128, 129, 300, 16_400, 70_000];

function randomTask(rng: Prng): SignedTask {
  const bytes = (n: number) => Uint8Array.from({ length: n }, () => rng.int(0, 255));
  const t = create(SignedTaskSchema, { spec: bytes(rng.pick(SIZES)), signature: bytes(rng.pick([0, 64])), keyId: rng.pick(KEY_IDS) });
  if (rng.int(0, 2) > 0) {
    const leaves = rng.pick([0, 1, 2, 3, 127, 128, 1000, 2 ** 31, 2 ** 32 - 1]);
    t.batch = create(TaskBatchProofSchema, {
      index: rng.pick([0, 1, 5, 127, 128, 999, 2 ** 32 - 1]),
      leaves,
      path: Array.from({ length: rng.int(0, 20) }, () => bytes(rng.pick([32, 32, 0, 1, 200]))),
      salt: bytes(rng.pick([0, 16, 16, 300])),
    });
  }
  return t;
}

describe("signed tasks encoded by hand", () => {
  it("writes every task exactly as protobuf-es does (seeded: sizes, empty fields, batch proofs of every shape)", () => {
    const rng = new Prng(15);
    for (let i = 0; i < 2000; i++) {
      const t = randomTask(rng);
      expect(hex(encodeSignedTask(t)), `task ${i}`).toBe(hex(reference(t)));
    }
  });

  it("leaves a task with fields this release does not know to protobuf-es, unknown fields and all", () => {
    const t = create(SignedTaskSchema, { spec: new Uint8Array([1, 2, 3]), keyId: "k" });
    t.$unknown = [{ no: 9, wireType: 0, data: new Uint8Array([5]) }];
    expect(hex(encodeSignedTask(t))).toBe(hex(reference(t)));
    const b = create(SignedTaskSchema, { spec: new Uint8Array([1]), batch: create(TaskBatchProofSchema, { index: 1, leaves: 2 }) });
    b.batch!.$unknown = [{ no: 9, wireType: 0, data: new Uint8Array([7]) }];
    expect(hex(encodeSignedTask(b))).toBe(hex(reference(b)));
    // An empty proof is still a proof: present, with no fields.
    const empty = create(SignedTaskSchema, { spec: new Uint8Array([1]), batch: create(TaskBatchProofSchema) });
    expect(hex(encodeSignedTask(empty))).toBe(hex(reference(empty)));
  });

  it("a frame with its tasks in wire form decodes to the frame it was, tasks in order", () => {
    const rng = new Prng(16);
    for (let round = 0; round < 50; round++) {
      const frame = create(ProxyStreamResponseSchema, {
        tasks: Array.from({ length: rng.int(0, 39) }, () => randomTask(rng)),
        cancels: Array.from({ length: rng.int(0, 2) }, (_, i) => create(CancelTaskSchema, { taskId: `t${i}`, hostId: `h${i}` })),
        replay: rng.int(0, 1) === 1,
        ping: rng.int(0, 4),
      });
      const wire = tasksAsWire(frame);
      if (frame.tasks.length > 0) expect(wire.tasks).toEqual([]);
      const back = fromBinary(ProxyStreamResponseSchema, toBinary(ProxyStreamResponseSchema, wire));
      expect(equals(ProxyStreamResponseSchema, back, frame), `round ${round}`).toBe(true);
      // The frame sent is left as it was.
      expect(frame.$unknown ?? []).toEqual([]);
    }
  });
});

describe("a frame's tasks as one unknown field", () => {
  it("encodes to the very bytes of the ordinary frame when the tasks are its only list", () => {
    const rng = new Prng(17);
    for (let round = 0; round < 50; round++) {
      const frame = create(ProxyStreamResponseSchema, { tasks: Array.from({ length: rng.int(1, 60) }, () => randomTask(rng)) });
      expect(hex(toBinary(ProxyStreamResponseSchema, tasksAsWire(frame))), `round ${round}`).toBe(hex(toBinary(ProxyStreamResponseSchema, frame)));
    }
  });
});
