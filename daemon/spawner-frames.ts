/**
 * Frames between the daemon and its spawner (daemon/spawner.ts,
 * daemon/spawner-main.ts), one pipe each way:
 * `u32 body length | u8 kind | u32 step id | body`, all big-endian.
 *
 * Imports nothing but Node's own modules: the spawner loads this file and
 * must stay small (its size is what every fork it makes copies).
 */

/** Kinds of frame. Daemon → spawner: SPAWN, ACK, DESTROY, PING, CANCEL. Spawner → daemon: the rest. */
export const FrameKind = {
  /** body: u32 JSON length | JSON {@link SpawnRequest} | stdin bytes. */
  SPAWN: 1,
  /** body: u32 bytes of the step's output the daemon has taken; the spawner reads on while under its window. */
  ACK: 2,
  /** No body: stop reading the step's output, close its pipes at the spawner. */
  DESTROY: 3,
  /** No body, id: a number the PONG echoes. */
  PING: 4,
  /**
   * No body: the daemon has ended the step without the spawner (it did not
   * answer in time) and forgets it. Not started yet: it never is; started
   * and not yet reaped: its group gets SIGKILL; either way its pipes are
   * closed and nothing more of it is sent.
   */
  CANCEL: 5,
  /** No body: the spawner is up and reads frames (sent once, before anything else). */
  READY: 10,
  /**
   * body: u32 pid of the started process (also its process group id), u64
   * its start time in clock ticks since boot (/proc/<pid>/stat field 22),
   * read before the spawner could reap it; 0 when it could not be read.
   */
  SPAWNED: 11,
  /** body: JSON {@link SpawnFailure}. No other frame of the step follows. */
  FAILED: 12,
  /** body: bytes the process wrote to stdout. */
  STDOUT: 13,
  /** body: bytes the process wrote to stderr. */
  STDERR: 14,
  /** body: u8 1 (stdout) or 2 (stderr): that pipe is closed, no more of its output follows. */
  CLOSED: 15,
  /** body: JSON {code, signal} as Node's 'exit' event gives them. */
  EXIT: 16,
  /** No body, id: the PING's. */
  PONG: 17,
} as const;

/** What the spawner starts: argv, working dir and the complete environment (nothing is inherited from the spawner). */
export interface SpawnRequest {
  program: string;
  args: string[];
  /** Absent: the spawner's own working directory, which is the daemon's. */
  cwd?: string;
  env: Record<string, string>;
}

/** Why a process could not be started. `sync`: spawn() threw (invalid arguments), no process was made. */
export interface SpawnFailure {
  sync: boolean;
  code?: string;
  message: string;
}

const HEADER = 9;

/** One frame, ready to write. */
export function frame(kind: number, id: number, body?: Uint8Array): Buffer {
  const len = body?.length ?? 0;
  const out = Buffer.allocUnsafe(HEADER + len);
  out.writeUInt32BE(len, 0);
  out.writeUInt8(kind, 4);
  out.writeUInt32BE(id, 5);
  if (body) out.set(body, HEADER);
  return out;
}

/** A frame whose body is one u32. */
export function u32Frame(kind: number, id: number, value: number): Buffer {
  const out = Buffer.allocUnsafe(HEADER + 4);
  out.writeUInt32BE(4, 0);
  out.writeUInt8(kind, 4);
  out.writeUInt32BE(id, 5);
  out.writeUInt32BE(value, HEADER);
  return out;
}

/** A frame whose body is JSON, optionally followed by raw bytes (SPAWN's stdin). */
export function jsonFrame(kind: number, id: number, value: unknown, tail?: Uint8Array): Buffer {
  const json = Buffer.from(JSON.stringify(value));
  if (tail === undefined) return frame(kind, id, json);
  const body = Buffer.allocUnsafe(4 + json.length + tail.length);
  body.writeUInt32BE(json.length, 0);
  body.set(json, 4);
  body.set(tail, 4 + json.length);
  return frame(kind, id, body);
}

/** A SPAWNED frame. */
export function spawnedFrame(id: number, pid: number, startTicks: number): Buffer {
  const body = Buffer.allocUnsafe(12);
  body.writeUInt32BE(pid, 0);
  body.writeBigUInt64BE(BigInt(startTicks), 4);
  return frame(FrameKind.SPAWNED, id, body);
}

/** A SPAWNED body: the pid, and its start time when the spawner could read it. */
export function readSpawned(body: Buffer): { pid: number; startTicks: number | undefined } {
  const startTicks = Number(body.readBigUInt64BE(4));
  return { pid: body.readUInt32BE(0), startTicks: startTicks > 0 ? startTicks : undefined };
}

/** Splits a SPAWN body into its request and its stdin bytes. */
export function readSpawn(body: Buffer): { request: SpawnRequest; stdin: Buffer } {
  const len = body.readUInt32BE(0);
  return { request: JSON.parse(body.toString("utf8", 4, 4 + len)) as SpawnRequest, stdin: body.subarray(4 + len) };
}

/** Sent in READY's body (u32): a daemon and a spawner of different protocols do not talk. 2: CANCEL. */
export const PROTOCOL_VERSION = 2;

/** Kinds each end may receive. */
export const TO_SPAWNER: ReadonlySet<number> = new Set([FrameKind.SPAWN, FrameKind.ACK, FrameKind.DESTROY, FrameKind.PING, FrameKind.CANCEL]);
export const TO_DAEMON: ReadonlySet<number> = new Set([
  FrameKind.READY, FrameKind.SPAWNED, FrameKind.FAILED, FrameKind.STDOUT, FrameKind.STDERR, FrameKind.CLOSED, FrameKind.EXIT, FrameKind.PONG,
]);
/**
 * Largest body each end accepts. SPAWN carries a step's environment and
 * stdin; output frames are one read of a pipe (64 KiB), so 16 MiB toward the
 * daemon is far above anything the spawner sends and far below what stray
 * text read as a length gives (e.g. "prel" = 1.9 GB).
 */
export const MAX_BODY_TO_SPAWNER = 256 * 1024 * 1024;
export const MAX_BODY_TO_DAEMON = 16 * 1024 * 1024;

/** Bodies of a fixed size, by kind: anything else is a violation. */
const FIXED: Record<number, number> = {
  [FrameKind.ACK]: 4,
  [FrameKind.DESTROY]: 0,
  [FrameKind.PING]: 0,
  [FrameKind.CANCEL]: 0,
  [FrameKind.READY]: 4,
  [FrameKind.SPAWNED]: 12,
  [FrameKind.CLOSED]: 4,
  [FrameKind.PONG]: 0,
};

/** The other end broke the protocol: what it sends can no longer be trusted. */
export class FrameError extends Error {}

/** What a {@link FrameReader} accepts. */
export interface FrameLimits {
  kinds: ReadonlySet<number>;
  maxBody: number;
  /**
   * The kind the first frame must be (the spawner's READY): any other is
   * refused at its header, so that what an end may send before it (nothing)
   * is never buffered.
   */
  first?: number;
}

/**
 * Cuts a byte stream into frames, checking each header (known kind, the
 * first frame's kind, body within the cap, a fixed-size body of its size)
 * before its body is read.
 * A violation throws {@link FrameError} from `push` and the reader takes
 * nothing more. Bodies handed to `onFrame` are buffers never written again:
 * a receiver may keep them. A large frame arriving in many reads is kept as
 * its chunks and joined once, when complete.
 */
export class FrameReader {
  private chunks: Buffer[] = [];
  private have = 0;
  /** The header of the frame being read, once its 9 bytes arrived. */
  private head: { len: number; kind: number; id: number } | undefined;
  private broken: FrameError | undefined;
  /** The kind the next frame must be, until one was read. */
  private first: number | undefined;

  constructor(
    private readonly onFrame: (kind: number, id: number, body: Buffer) => void,
    private readonly limits: FrameLimits = { kinds: new Set(Object.values(FrameKind)), maxBody: MAX_BODY_TO_SPAWNER },
  ) {
    this.first = limits.first;
  }

  push(chunk: Buffer): void {
    if (this.broken) throw this.broken;
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.have += chunk.length;
    for (;;) {
      if (this.head === undefined) {
        if (this.have < HEADER) return;
        const h = this.take(HEADER);
        const head = { len: h.readUInt32BE(0), kind: h.readUInt8(4), id: h.readUInt32BE(5) };
        const why = !this.limits.kinds.has(head.kind)
          ? `unknown frame kind ${head.kind}`
          : this.first !== undefined && head.kind !== this.first
            ? `frame kind ${head.kind} before the first frame, of kind ${this.first}`
            : head.len > this.limits.maxBody
              ? `frame body of ${head.len} bytes over the cap of ${this.limits.maxBody}`
              : FIXED[head.kind] !== undefined && FIXED[head.kind] !== head.len
                ? `frame kind ${head.kind} with a body of ${head.len} bytes, not ${FIXED[head.kind]}`
                : undefined;
        if (why !== undefined) {
          this.broken = new FrameError(why);
          this.chunks = [];
          this.have = 0;
          throw this.broken;
        }
        this.head = head;
        this.first = undefined;
      }
      if (this.have < this.head.len) return;
      const { len, kind, id } = this.head;
      this.head = undefined;
      this.onFrame(kind, id, this.take(len));
    }
  }

  /** The next n buffered bytes, joined once; what is left of the last chunk used stays. */
  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      // A copy of a small remainder, so that views handed out do not keep a large read alive.
      else this.chunks[0] = first.length - n < 4096 && first.length > 65536 ? Buffer.from(first.subarray(n)) : first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      let used = 0;
      while (at < n) {
        const c = this.chunks[used]!;
        const k = Math.min(c.length, n - at);
        out.set(k === c.length ? c : c.subarray(0, k), at);
        at += k;
        if (k === c.length) used += 1;
        else this.chunks[used] = c.subarray(k);
      }
      this.chunks.splice(0, used);
    }
    this.have -= n;
    return out;
  }
}
