/**
 * Frames between the daemon and its spawner (daemon/spawner.ts,
 * daemon/spawner-main.ts), one pipe each way:
 * `u32 body length | u8 kind | u32 step id | body`, all big-endian.
 *
 * Imports nothing but Node's own modules: the spawner loads this file and
 * must stay small (its size is what every fork it makes copies).
 */

/** Kinds of frame. Daemon → spawner: SPAWN, ACK, DESTROY, PING. Spawner → daemon: the rest. */
export const FrameKind = {
  /** body: u32 JSON length | JSON {@link SpawnRequest} | stdin bytes. */
  SPAWN: 1,
  /** body: u32 bytes of the step's output the daemon has taken; the spawner reads on while under its window. */
  ACK: 2,
  /** No body: stop reading the step's output, close its pipes at the spawner. */
  DESTROY: 3,
  /** No body, id: a number the PONG echoes. */
  PING: 4,
  /** No body: the spawner is up and reads frames (sent once, before anything else). */
  READY: 10,
  /** body: u32 pid of the started process (also its process group id). */
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

/** Splits a SPAWN body into its request and its stdin bytes. */
export function readSpawn(body: Buffer): { request: SpawnRequest; stdin: Buffer } {
  const len = body.readUInt32BE(0);
  return { request: JSON.parse(body.toString("utf8", 4, 4 + len)) as SpawnRequest, stdin: body.subarray(4 + len) };
}

/**
 * Cuts a byte stream into frames. Bodies handed to `onFrame` are views of
 * buffers never written again: a receiver may keep them.
 */
export class FrameReader {
  private pending: Buffer | undefined;

  constructor(private readonly onFrame: (kind: number, id: number, body: Buffer) => void) {}

  push(chunk: Buffer): void {
    let buf = this.pending === undefined ? chunk : Buffer.concat([this.pending, chunk]);
    this.pending = undefined;
    let at = 0;
    while (buf.length - at >= HEADER) {
      const len = buf.readUInt32BE(at);
      if (buf.length - at < HEADER + len) break;
      const kind = buf.readUInt8(at + 4);
      const id = buf.readUInt32BE(at + 5);
      const body = buf.subarray(at + HEADER, at + HEADER + len);
      at += HEADER + len;
      this.onFrame(kind, id, body);
    }
    if (at < buf.length) {
      buf = buf.subarray(at);
      // A copy, so that the views handed out above do not keep a large read alive for a small remainder.
      this.pending = Buffer.from(buf);
    }
  }
}
