/**
 * A task as clients see it (controller.proto Task): as a message for the
 * unary RPCs ({@link taskToProto}), and in its wire form for the watch
 * streams ({@link encodeTask}, {@link watchResponse}).
 *
 * A fleet-wide job sends every task to its watchers about twice; protobuf-es
 * building each Task with create() and encoding it by reflection was the
 * controller's largest single cost in a 10,000-host ping (about 33 µs per
 * task update). Here a TaskRecord is encoded by hand straight into its wire
 * form, exactly as protobuf-es encodes the message taskToProto makes (fields
 * in number order, defaults left out), and the frame's encoder is handed the
 * encoded tasks as unknown fields of the list's number, which protobuf-es
 * writes as they are (as common/output-wire.ts does for output chunks). The
 * receiver sees an ordinary repeated field; the frame's bytes are the same.
 */
import { create, toBinary, type MessageShape } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { isInt32, isUint53, ProtoWriter } from "../common/proto-wire.js";
import { outputAsWireFor } from "../common/output-wire.js";
import {
  LateReportSchema,
  TaskSchema,
  type Job,
  type SubmitAndWatchResponseSchema,
  type Task,
  WatchJobResponseSchema,
} from "../gen/rexmesh/v1/controller_pb.js";
import { StepSchema, type OutputChunk, type Step } from "../gen/rexmesh/v1/task_pb.js";
import { outputComplete } from "./jobs.js";
import type { LateReport, TaskRecord } from "./model.js";

/** A task for clients; `steps` (a document run's redacted steps for the host) only where asked. */
export function taskToProto(t: TaskRecord, steps?: Step[]): Task {
  return create(TaskSchema, {
    id: t.id,
    jobId: t.jobId,
    hostId: t.hostId,
    region: t.region,
    proxy: t.proxy,
    state: t.state,
    exitCode: t.exitCode,
    signal: t.signal,
    message: t.message,
    updatedAt: timestampFromMs(t.updatedAt),
    outputTruncated: t.outputTruncated,
    outputChunks: BigInt(t.outputChunks),
    steps: steps ?? [],
    outputChunksExpected: BigInt(t.expectedChunks ?? 0),
    outputComplete: outputComplete(t),
    resultCheck: t.resultCheck,
    lateReport: t.late && create(LateReportSchema, { state: t.late.state, exitCode: t.late.exitCode, signal: t.late.signal, message: t.late.message, time: timestampFromMs(t.late.time) }),
  });
}

const writer = new ProtoWriter();

/** A time the hand encoder writes: whole milliseconds since the epoch (what the clock gives). */
const isTime = isUint53;

/** Whether the hand encoder covers the record; what it does not (no record the controller keeps) goes to protobuf-es. */
function covered(t: TaskRecord): boolean {
  const late = t.late;
  return (
    isInt32(t.state) &&
    (t.exitCode == null || isInt32(t.exitCode)) &&
    isTime(t.updatedAt) &&
    isUint53(t.outputChunks) &&
    (t.expectedChunks == null || isUint53(t.expectedChunks)) &&
    (t.resultCheck == null || isInt32(t.resultCheck)) &&
    (late == null || (isInt32(late.state) && (late.exitCode == null || isInt32(late.exitCode)) && isTime(late.time)))
  );
}

/** A google.protobuf.Timestamp field, as timestampFromMs makes it. */
function timestamp(w: ProtoWriter, no: number, ms: number): void {
  const seconds = Math.floor(ms / 1000);
  const nanos = (ms - seconds * 1000) * 1_000_000;
  w.tag(no, WireType.LengthDelimited).fork();
  if (seconds !== 0) w.uint(1, seconds);
  if (nanos !== 0) w.uint(2, nanos);
  w.join();
}

function lateReport(w: ProtoWriter, no: number, late: LateReport): void {
  w.tag(no, WireType.LengthDelimited).fork();
  if (late.state) w.int32(1, late.state);
  if (late.exitCode != null) w.int32(2, late.exitCode);
  if (late.signal) w.string(3, late.signal);
  if (late.message) w.string(4, late.message);
  timestamp(w, 5, late.time);
  w.join();
}

/**
 * The task as one element of a repeated Task field (its length as a varint,
 * then the message): byte for byte `toBinary(TaskSchema, taskToProto(t, steps))`
 * behind its length.
 */
export function encodeTask(t: TaskRecord, steps?: Step[]): Uint8Array {
  writeTask(writer.reset(), t, steps);
  return writer.finish();
}

/** Writes the task into `w` as {@link encodeTask} encodes it. */
function writeTask(w: ProtoWriter, t: TaskRecord, steps?: Step[]): void {
  w.fork();
  if (!covered(t)) {
    w.raw(toBinary(TaskSchema, taskToProto(t, steps))).join();
    return;
  }
  if (t.id) w.string(1, t.id);
  if (t.jobId) w.string(2, t.jobId);
  if (t.hostId) w.string(3, t.hostId);
  if (t.region) w.string(4, t.region);
  if (t.proxy) w.string(5, t.proxy);
  if (t.state) w.int32(6, t.state);
  if (t.exitCode != null) w.int32(7, t.exitCode);
  if (t.signal) w.string(8, t.signal);
  if (t.message) w.string(9, t.message);
  timestamp(w, 10, t.updatedAt);
  if (t.outputTruncated) w.bool(11, true);
  if (t.outputChunks) w.uint(12, t.outputChunks);
  for (const step of steps ?? []) w.tag(13, WireType.LengthDelimited).fork().raw(toBinary(StepSchema, step)).join();
  if (t.expectedChunks) w.uint(14, t.expectedChunks);
  if (outputComplete(t)) w.bool(15, true);
  if (t.late) lateReport(w, 16, t.late);
  if (t.resultCheck) w.int32(17, t.resultCheck);
  w.join();
}

/**
 * Tasks as the bytes of one unknown field of a repeated Task field's number
 * `no`: every element in turn, each after the first with its own tag. What
 * protobuf-es writes of an unknown field is its tag, then its bytes as they
 * are, so the message's bytes are those of the ordinary one; one field per
 * task would cost protobuf-es a small buffer per task for its tag.
 */
export function encodeTaskRun(tasks: readonly TaskRecord[], no: number): Uint8Array {
  const w = writer.reset();
  tasks.forEach((t, i) => {
    if (i > 0) w.tag(no, WireType.LengthDelimited);
    writeTask(w, t);
  });
  return w.finish();
}

type WatchSchema = typeof WatchJobResponseSchema | typeof SubmitAndWatchResponseSchema;

/** One message of a watch stream, before it is encoded. */
export interface WatchFrame {
  job?: Job;
  tasks: readonly TaskRecord[];
  output: OutputChunk[];
}

/**
 * A WatchJob or SubmitAndWatch response. With `wire` (the call's responses
 * are binary) its tasks and output chunks are in their wire form, as unknown
 * fields of their lists' numbers in field order, so that the frame's bytes
 * are what the ordinary message encodes to; without (JSON, which leaves
 * unknown fields out) it is the ordinary message.
 */
export function watchResponse<D extends WatchSchema>(schema: D, frame: WatchFrame, wire: boolean): MessageShape<D> {
  // The two responses are the same shape: job, tasks, output.
  const same = schema as typeof WatchJobResponseSchema;
  if (!wire) return create(same, { job: frame.job, tasks: frame.tasks.map((t) => taskToProto(t)), output: frame.output }) as MessageShape<D>;
  const msg = create(same, { job: frame.job, output: frame.output }) as MessageShape<D>;
  const no = schema.field.tasks.number;
  if (frame.tasks.length > 0) msg.$unknown = [{ no, wireType: WireType.LengthDelimited, data: encodeTaskRun(frame.tasks, no) }];
  return outputWire(schema)(msg);
}

const outputWires = new Map<WatchSchema, (msg: never) => unknown>();

/** The schema's `outputAsWireFor`, made once. */
function outputWire<D extends WatchSchema>(schema: D): (msg: MessageShape<D>) => MessageShape<D> {
  let f = outputWires.get(schema);
  if (!f) outputWires.set(schema, (f = outputAsWireFor(schema)!));
  return f as (msg: MessageShape<D>) => MessageShape<D>;
}
