import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Database } from "lmdb";
import { OutputChunkSchema, TaskStatusSchema, type TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { HostEventSchema } from "../gen/rexmesh/v1/event_pb.js";
import { chunkFromWire, encodeOutputChunk, rememberWire } from "./output-wire.js";
import { HeldItems, isVolatile, mergeByPosition, PositionLog, takeAfter, upwardKey, type Backlog, type Held, type UpwardItem } from "./backlog.js";

const STATUS = 1;
const OUTPUT = 2;
const EVENT = 3;
/**
 * An output chunk is stored as OUTPUT, then a varint field 15 (a number
 * OutputChunk does not define), whose value is the chunk's length, then the
 * chunk: from the second byte on, that is the chunk's wire form
 * (common/output-wire.ts), which the frame that carries it up writes as it
 * is. An earlier version reads the same bytes as a bare chunk with one
 * unknown field (so a daemon rolled back after an update still reads its
 * outbox), and the bare chunks earlier versions stored start with another
 * byte (a field 1–5 tag).
 */
const WIRE_MARK = (15 << 3) | 0;

function encodeItem(item: UpwardItem): Buffer {
  if (item.kind === "output") {
    const out = encodeOutputChunk(item.chunk, 2);
    out[0] = OUTPUT;
    out[1] = WIRE_MARK;
    rememberWire(item.chunk, out.subarray(2));
    return out;
  }
  const body = item.kind === "status" ? toBinary(TaskStatusSchema, item.status) : toBinary(HostEventSchema, item.event);
  const out = Buffer.allocUnsafe(body.length + 1);
  out[0] = item.kind === "status" ? STATUS : EVENT;
  out.set(body, 1);
  return out;
}

export function decodeItem(buf: Uint8Array): UpwardItem {
  // The chunk's data is a view into `buf`: no copy, and the frame that carries it up writes these bytes as they are.
  if (buf[0] === OUTPUT && buf[1] === WIRE_MARK) return { kind: "output", chunk: chunkFromWire(buf.subarray(2)) };
  const body = buf.subarray(1);
  if (buf[0] === EVENT) return { kind: "event", event: fromBinary(HostEventSchema, body) };
  return buf[0] === STATUS ? { kind: "status", status: fromBinary(TaskStatusSchema, body) } : { kind: "output", chunk: fromBinary(OutputChunkSchema, body) };
}

/**
 * A backlog in LMDB, under a scope (one per host in a daemon process that
 * serves several). Items are stored in push order under an increasing
 * number; an in-memory index (HeldItems) maps each item's identity to its
 * number, and each task to its items (chunks in seq order), so that acks
 * delete without scanning. The index is rebuilt at open.
 */
export class LmdbBacklog implements Backlog {
  private readonly held = new HeldItems();
  private next = 1;
  /** Items pushed whose write has not committed yet: all() must include them too. */
  private readonly inFlight = new PositionLog();
  /** Volatile items (UpwardItem): held in memory only, never written, gone with the process. */
  private readonly inMemory = new PositionLog();
  /** The highest number ever given to an item that is written: past it, nothing is to be read from LMDB. */
  private lastWritten = 0;

  constructor(
    private readonly db: Database<Buffer, (string | number)[]>,
    private readonly scope: string,
  ) {
    for (const { key, value } of db.getRange({ start: [scope, 0], end: [scope, Number.MAX_SAFE_INTEGER] })) {
      const n = key[1] as number;
      const item = decodeItem(value);
      this.held.add(upwardKey(item), n, item);
      this.next = Math.max(this.next, n + 1);
      this.lastWritten = Math.max(this.lastWritten, n);
    }
  }

  get size(): number {
    return this.held.size;
  }

  get bytes(): number {
    return this.held.bytes;
  }

  push(items: readonly UpwardItem[]): Promise<void> {
    const writes: Promise<unknown>[] = [];
    const pushed: { key: string; n: number }[] = [];
    for (const item of items) {
      const key = upwardKey(item);
      if (this.held.has(key)) continue;
      const n = this.next++;
      this.held.add(key, n, item);
      if (isVolatile(item)) {
        this.inMemory.add(n, item);
        continue;
      }
      this.inFlight.add(n, item);
      this.lastWritten = n;
      pushed.push({ key, n });
      writes.push(this.db.put([this.scope, n], encodeItem(item)).finally(() => this.inFlight.delete(n)));
    }
    // An item whose write failed is forgotten before the caller hears of it: were it left in the
    // index, the sender's resend of it would pass for a duplicate and be acknowledged unstored.
    return Promise.allSettled(writes).then((results) => {
      let failure: PromiseRejectedResult | undefined;
      results.forEach((r, i) => {
        if (r.status === "fulfilled") return;
        failure ??= r;
        const { key, n } = pushed[i]!;
        if (this.held.numberOf(key) !== n) return; // acknowledged meanwhile: the ack took it
        this.held.remove(key);
      });
      if (failure) throw failure.reason;
    });
  }

  /** Deletes items an ack took from the index. */
  private drop(taken: readonly Held[]): Promise<void> {
    const writes: Promise<unknown>[] = [];
    for (const { n } of taken) {
      if (this.inMemory.delete(n)) continue;
      this.inFlight.delete(n);
      writes.push(this.db.remove([this.scope, n]));
    }
    return Promise.all(writes).then(() => undefined);
  }

  ackOutput(taskId: string, seq: number): Promise<void> {
    return this.drop(this.held.takeOutputAcked(taskId, seq));
  }

  ackStatus(taskId: string, state: TaskState, atProxy = false): Promise<void> {
    return this.drop(this.held.takeStatusAcked(taskId, state, atProxy));
  }

  ackEvent(hostId: string, eventId: string): Promise<void> {
    return this.drop(this.held.takeEventAcked(hostId, eventId));
  }

  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
    return takeAfter(this.entries(after), after, maxBytes);
  }

  /**
   * Held items after a position, in push order: those committed (read from
   * LMDB), those whose write is in flight and the volatile ones, merged by
   * number (each map is in push order; a write that commits while this runs
   * may be seen in both, and is taken once).
   */
  private entries(after: number): Generator<{ n: number; item: UpwardItem }> {
    const self = this;
    function* committed(): Generator<{ n: number; item: UpwardItem }> {
      // Only volatile items came since (a fleet's ping answers): no read of LMDB at all.
      if (after >= self.lastWritten) return;
      for (const { key, value } of self.db.getRange({ start: [self.scope, after + 1], end: [self.scope, Number.MAX_SAFE_INTEGER] })) {
        const n = key[1] as number;
        if (self.held.holdsNumber(n)) yield { n, item: decodeItem(value) };
      }
    }
    function* held(log: PositionLog): Generator<{ n: number; item: UpwardItem }> {
      for (const e of log.after(after)) if (self.held.holdsNumber(e.n)) yield e;
    }
    return mergeByPosition(committed(), held(this.inFlight), held(this.inMemory));
  }

  topOutputSeq(taskId: string): number {
    return this.held.topOutputSeq(taskId);
  }

  /** Everything held, in push order. */
  all(): UpwardItem[] {
    return [...this.entries(0)].map((e) => e.item);
  }
}
