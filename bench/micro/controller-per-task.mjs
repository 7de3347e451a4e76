// node bench/micro/controller-per-task.mjs [--tasks 4000]: the CPU of the controller's per-task steps
// that the 4,000-host ping profile named, old way against the way built now, in this process:
// a task id (randomBytes(8) per id against a pool), a frame of SignedTasks to a proxy (protobuf-es
// reflective encode against controller/signed-task-wire.ts, pings and batch-signed tasks), and a
// watch batch's tasks (one unknown field per task against one per batch), and a watch's pass over
// changed tasks (a signature string per task against a field-by-field compare with the copy sent). Median of 7 rounds after 2 warm-up rounds.
// The controller as built in dist/ (npm run build first).
import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import { create, toBinary } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
import { timeOrderedIds } from "../../dist/common/ids.js";
import { tasksAsWire } from "../../dist/controller/signed-task-wire.js";
import { encodeTask, watchResponse } from "../../dist/controller/task-wire.js";
import { sameAsSent } from "../../dist/controller/watch.js";
import { ProxyStreamResponseSchema } from "../../dist/gen/rexmesh/v1/proxy_link_pb.js";
import { WatchJobResponseSchema } from "../../dist/gen/rexmesh/v1/controller_pb.js";
import { SignedTaskSchema, TaskBatchProofSchema } from "../../dist/gen/rexmesh/v1/task_pb.js";

const { values } = parseArgs({ options: { tasks: { type: "string", default: "4000" } } });
const N = Number(values.tasks);
const cpu = () => { const u = process.cpuUsage(); return u.user + u.system; };
function measure(fn) {
  const rounds = [];
  for (let r = 0; r < 9; r++) {
    const c0 = cpu();
    fn();
    rounds.push((cpu() - c0) / N);
  }
  const warm = rounds.slice(2).sort((a, b) => a - b);
  return warm[Math.floor(warm.length / 2)].toFixed(2);
}

const ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz";
const encodeTime = (ms) => { let out = ""; let n = ms; for (let i = 0; i < 10; i++) { out = ALPHABET[n % 32] + out; n = Math.floor(n / 32); } return out; };
function oldIds() {
  let last = ""; let counter = 0;
  return (prefix) => {
    const time = encodeTime(Date.now());
    counter = time === last ? counter + 1 : 0; last = time;
    const rnd = Array.from(randomBytes(8), (b) => ALPHABET[b % 32]).join("");
    return `${prefix}${time}${counter.toString(32).padStart(3, "0")}${rnd}`;
  };
}
const clock = { now: () => Date.now() };
const oldId = oldIds(); const newId = timeOrderedIds(clock);
const sink = [];
console.log(`per task, µs of CPU (${N} tasks a round):`);
console.log(`  task id: randomBytes per id ${measure(() => { for (let i = 0; i < N; i++) sink[i] = oldId("t"); })}, from a pool ${measure(() => { for (let i = 0; i < N; i++) sink[i] = newId("t"); })}`);

const spec = randomBytes(150);
const ping = Array.from({ length: N }, () => create(SignedTaskSchema, { spec }));
const signed = Array.from({ length: N }, (_, i) => create(SignedTaskSchema, { spec, signature: randomBytes(64), keyId: "x0123456789abcdef0123456789abcdef", batch: create(TaskBatchProofSchema, { index: i % 1000, leaves: 1000, path: Array.from({ length: 10 }, () => randomBytes(32)), salt: randomBytes(16) }) }));
for (const [what, tasks] of [["ping", ping], ["batch-signed", signed]]) {
  const frames = [];
  for (let i = 0; i < N; i += 1000) frames.push(create(ProxyStreamResponseSchema, { tasks: tasks.slice(i, i + 1000) }));
  console.log(`  a frame's ${what} tasks: protobuf-es ${measure(() => { for (const f of frames) toBinary(ProxyStreamResponseSchema, f); })}, by hand ${measure(() => { for (const f of frames) toBinary(ProxyStreamResponseSchema, tasksAsWire(f)); })}`);
}

const records = Array.from({ length: N }, (_, i) => ({ id: `t0123456789abc${i}`, jobId: "j0123456789abcdef", tenant: "acme", hostId: `host-${i}.r1.example`, region: "r1", proxy: "p1", state: 10, exitCode: 0, signal: "", message: "pong", updatedAt: 1_700_000_000_123, outputChunks: 0, outputTruncated: false, expectedChunks: 0 }));
const batches = []; for (let i = 0; i < N; i += 500) batches.push(records.slice(i, i + 500));
const no = WatchJobResponseSchema.field.tasks.number;
console.log(`  a watch batch's tasks: a field each ${measure(() => { for (const b of batches) { const m = create(WatchJobResponseSchema); m.$unknown = b.map((t) => ({ no, wireType: WireType.LengthDelimited, data: encodeTask(t) })); toBinary(WatchJobResponseSchema, m); } })}, one field ${measure(() => { for (const b of batches) toBinary(WatchJobResponseSchema, watchResponse(WatchJobResponseSchema, { tasks: b, output: [] }, true)); })}`);

// A watch's pass over a batch of changed tasks: is each one different from what was sent, and if so a copy goes out.
const signature = (t) => `${t.state}|${t.exitCode ?? ""}|${t.signal}|${t.proxy}|${t.outputTruncated}|${t.message}|${t.expectedChunks ?? ""}|${t.late?.state ?? ""}`;
const pass = (changed, compare) => {
  const sentSig = new Map(); const sentRec = new Map(); let round = 0;
  const oldWay = () => { for (const r of records) { if (changed) r.state = 10 + (round & 1); const copy = { ...r }; const sig = signature(copy); if (sentSig.get(r.id) === sig) continue; sentSig.set(r.id, sig); sink.push(copy); } round++; sink.length = 0; };
  const newWay = () => { for (const r of records) { if (changed) r.state = 10 + (round & 1); if (compare(r, sentRec.get(r.id))) continue; const copy = { ...r }; sentRec.set(r.id, copy); sink.push(copy); } round++; sink.length = 0; };
  return [measure(oldWay), measure(newWay)];
};
for (const changed of [true, false]) {
  const [o, n] = pass(changed, sameAsSent);
  console.log(`  a watch's pass, every task ${changed ? "changed" : "unchanged"}: a signature string each ${o}, compared by field ${n}`);
}
