// node bench/micro/proxy-link-wire.mjs [BASE_DIST]: µs of CPU per host of the controller link's frames at the proxy,
// as connect-es called protobuf-es for them (fromBinary; toBinary with output in wire form) against the hand codecs
// (common/proxy-link-wire.ts), on frames of 500 hosts: ping tasks down (a spec alone, as the controller's SpecEncoder
// writes it), batch-signed tasks down (64-byte signature, 12 proof hashes), acknowledgements in runs down, a ping's
// answers up in one status run; and SpecDecoder.peek per task (the ids read by hand), against BASE_DIST's (a build
// of an earlier commit, e.g. /work/plink-base/dist) when given. The code as built in dist/ (npm run build first).
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { randomBytes } from "node:crypto";
import { pathToFileURL } from "node:url";
import { decodeProxyResponse, encodeProxyRequest } from "../../dist/common/proxy-link-wire.js";
import { encodeWithWireOutput } from "../../dist/common/output-wire.js";
import { ackRunsOf, StatusRunBuilder } from "../../dist/common/status-runs.js";
import { peekSpec, SpecDecoder, SpecEncoder } from "../../dist/common/task-signing.js";
import { tasksAsWire } from "../../dist/controller/signed-task-wire.js";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema } from "../../dist/gen/rexmesh/v1/proxy_link_pb.js";
import { SignedTaskSchema, TaskBatchProofSchema, TaskSpecSchema, TaskState, TaskStatusSchema } from "../../dist/gen/rexmesh/v1/task_pb.js";

const T = 500;
const id = (i) => `01JF3Z8W4K7M2N5P9Q1R${String(i).padStart(6, "0")}`;
const host = (i) => `host-${String(i).padStart(5, "0")}`;
const encoder = new SpecEncoder();
const ping = [{ $typeName: "rexmesh.v1.Step", name: "", tool: { case: "ping", value: { $typeName: "rexmesh.v1.PingTool" } } }];
const spec = (i) => create(TaskSpecSchema, { taskId: id(i), jobId: "01JF3Z8W4K7M2N5P9Q1RJOB000", tenant: "acme", hostId: host(i), steps: ping, timeout: durationFromMs(60_000), deliverBy: timestampFromMs(Date.now() + 600_000), createdAt: timestampFromMs(Date.now()) });
const pings = Array.from({ length: T }, (_, i) => ({ $typeName: "rexmesh.v1.SignedTask", spec: encoder.encode(spec(i)), signature: new Uint8Array(0), keyId: "" }));
const signature = randomBytes(64);
const signed = pings.map((t, i) =>
  create(SignedTaskSchema, { spec: t.spec, signature, keyId: "k-2b7e1516", batch: create(TaskBatchProofSchema, { index: i, leaves: 4000, path: Array.from({ length: 12 }, () => randomBytes(32)), salt: randomBytes(16) }) }),
);
// As the controller writes them (its tasks by hand: controller/signed-task-wire.ts).
const down = (init) => toBinary(ProxyStreamResponseSchema, tasksAsWire(create(ProxyStreamResponseSchema, init)));
const downPings = down({ tasks: pings });
const downSigned = down({ tasks: signed });
const downAcks = down({ statusAckRuns: ackRunsOf(pings.map((_, i) => ({ taskId: id(i), state: TaskState.SUCCEEDED, atProxy: false }))) });
const runs = new StatusRunBuilder();
const time = timestampFromMs(Date.now());
for (let i = 0; i < T; i++) runs.add(create(TaskStatusSchema, { taskId: id(i), hostId: host(i), state: TaskState.SUCCEEDED, time, exitCode: 0, message: "pong" }));
const up = create(ProxyStreamRequestSchema, { statusRuns: runs.runs, statuses: runs.statuses });
const upByProtobufEs = encodeWithWireOutput(ProxyStreamRequestSchema);

function perHost(label, f) {
  for (let i = 0; i < 300; i++) f();
  const n = 2000;
  const t0 = process.cpuUsage();
  for (let i = 0; i < n; i++) f();
  const t = process.cpuUsage(t0);
  console.log(`${label.padEnd(52)} ${((t.user + t.system) / n / T).toFixed(3)} µs per host`);
}

const base = process.argv[2] ? await import(pathToFileURL(`${process.argv[2]}/common/task-signing.js`).href) : undefined;
const tasks = decodeProxyResponse(downPings).tasks;
for (let round = 1; round <= 2; round++) {
  console.log(`round ${round} (frames of ${T} hosts: ${downPings.length}, ${downSigned.length}, ${downAcks.length} bytes down; ${encodeProxyRequest(up).length} up)`);
  perHost("down, ping tasks: fromBinary (protobuf-es)", () => fromBinary(ProxyStreamResponseSchema, downPings));
  perHost("down, ping tasks: decodeProxyResponse (by hand)", () => decodeProxyResponse(downPings));
  perHost("down, batch-signed tasks: fromBinary", () => fromBinary(ProxyStreamResponseSchema, downSigned));
  perHost("down, batch-signed tasks: by hand", () => decodeProxyResponse(downSigned));
  perHost("down, acks in runs: fromBinary", () => fromBinary(ProxyStreamResponseSchema, downAcks));
  perHost("down, acks in runs: by hand", () => decodeProxyResponse(downAcks));
  perHost("up, a ping's answers in a run: toBinary (wire output)", () => upByProtobufEs(up));
  perHost("up, a ping's answers in a run: encodeProxyRequest", () => encodeProxyRequest(up));
  perHost("SpecDecoder.peek: each spec whole (peekSpec)", () => tasks.forEach((t) => peekSpec(t)));
  if (base) {
    const old = new base.SpecDecoder();
    perHost(`SpecDecoder.peek: ${process.argv[2]}`, () => tasks.forEach((t) => old.peek(t)));
  }
  const now = new SpecDecoder();
  perHost("SpecDecoder.peek: now (ids by hand)", () => tasks.forEach((t) => now.peek(t)));
}
