// node bench/micro/task-wire.mjs: µs per Task encode for a WatchJob stream, protobuf-es (create via
// taskToProto, then toBinary) against the hand encoder (controller/task-wire.ts), alone and as
// a 1,000-task WatchJobResponse frame; the controller as built in dist/ (npm run build first).
import { create, toBinary } from "@bufbuild/protobuf";
import { encodeTask, taskToProto, watchResponse } from "../../dist/controller/task-wire.js";
import { TaskSchema, WatchJobResponseSchema } from "../../dist/gen/rexmesh/v1/controller_pb.js";
const N = 1000;
const tasks = Array.from({ length: N }, (_, i) => ({
  id: `t-${(1e6 + i).toString(36)}-4f1c2a9e`, jobId: "j-lq2x8k-7d3e", tenant: "acme", hostId: `host-${String(i).padStart(5, "0")}.r1.example`, region: i % 2 ? "r1" : "r2", proxy: i % 2 ? "px-r1" : "px-r2",
  state: 10, exitCode: 0, signal: "", message: "", updatedAt: 1_700_000_000_123 + i, outputChunks: 1, expectedChunks: 1, outputTruncated: false, resultCheck: 1,
}));
function time(label, fn, reps) {
  let best = Infinity;
  for (let r = 0; r < 15; r++) {
    const t0 = process.hrtime.bigint();
    for (let k = 0; k < reps; k++) fn();
    const us = Number(process.hrtime.bigint() - t0) / 1000 / (reps * N);
    best = Math.min(best, us);
  }
  console.log(`${label.padEnd(44)} ${best.toFixed(3)} µs per task (best of 15)`);
  return best;
}
let sink = 0;
const a = time("protobuf-es: toBinary(taskToProto(t))", () => { for (const t of tasks) sink += toBinary(TaskSchema, taskToProto(t)).length; }, 10);
const b = time("hand: encodeTask(t)", () => { for (const t of tasks) sink += encodeTask(t).length; }, 10);
const c = time("frame of 1,000, ordinary (create+toBinary)", () => { sink += toBinary(WatchJobResponseSchema, create(WatchJobResponseSchema, { tasks: tasks.map((t) => taskToProto(t)) })).length; }, 10);
const d = time("frame of 1,000, wire form", () => { sink += toBinary(WatchJobResponseSchema, watchResponse(WatchJobResponseSchema, { tasks, output: [] }, true)).length; }, 10);
console.log(`per task ${(a / b).toFixed(1)}x; per frame ${(c / d).toFixed(1)}x  (${sink > 0})`);
