// node bench/micro/agent-link-wire.mjs: µs of CPU per host link frame at the proxy, as
// protobuf-es reads and writes it (decodeBounded, toBinary) against the hand codecs
// (common/agent-link-wire.ts): a host's ping answer up (one status and its credits), and a
// frame down with one batch-signed task (a ping's spec, a 64-byte signature, a proof of 13
// hashes for a 10,000-task batch). The code as built in dist/ (npm run build first).
import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { randomBytes } from "node:crypto";
import { decodeAgentRequest, encodeAgentResponse } from "../../dist/common/agent-link-wire.js";
import { decodeBounded } from "../../dist/common/decode-budget.js";
import { AgentStreamRequestSchema, AgentStreamResponseSchema } from "../../dist/gen/rexmesh/v1/agent_link_pb.js";
import { SignedTaskSchema, TaskBatchProofSchema, TaskState, TaskStatusSchema } from "../../dist/gen/rexmesh/v1/task_pb.js";

const N = 200_000;
const up = Buffer.from(
  toBinary(
    AgentStreamRequestSchema,
    create(AgentStreamRequestSchema, {
      statuses: [create(TaskStatusSchema, { taskId: "01JF3Z8W4K7M2N5P9Q1R3S5T7V", hostId: "host-04711", state: TaskState.SUCCEEDED, time: timestampFromMs(Date.now()), exitCode: 0, message: "pong" })],
      credits: 64,
    }),
  ),
);
const down = create(AgentStreamResponseSchema, {
  tasks: [
    create(SignedTaskSchema, {
      spec: randomBytes(120),
      signature: randomBytes(64),
      keyId: "k-2b7e1516",
      batch: create(TaskBatchProofSchema, { index: 4711, leaves: 10_000, path: Array.from({ length: 13 }, () => randomBytes(32)), salt: randomBytes(16) }),
    }),
  ],
});

function time(label, f) {
  for (let i = 0; i < N / 10; i++) f();
  const t0 = process.cpuUsage();
  for (let i = 0; i < N; i++) f();
  const t = process.cpuUsage(t0);
  const us = (t.user + t.system) / N;
  console.log(`${label.padEnd(44)} ${us.toFixed(2)} µs`);
  return us;
}

for (let round = 1; round <= 2; round++) {
  console.log(`round ${round} (${up.length}-byte frame up, ${toBinary(AgentStreamResponseSchema, down).length}-byte frame down)`);
  time("up: decodeBounded (protobuf-es)", () => decodeBounded(AgentStreamRequestSchema, up));
  time("up: decodeAgentRequest (by hand)", () => decodeAgentRequest(up));
  time("down: toBinary (protobuf-es)", () => toBinary(AgentStreamResponseSchema, down));
  time("down: encodeAgentResponse (by hand)", () => encodeAgentResponse(down));
}
