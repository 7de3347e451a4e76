/**
 * Recordings of sessions and port forwards (docs/sessions.md, "Recording"),
 * kept by the controller in its LMDB store: every byte both ways with its
 * time, written as it passes the controller's relay, and a summary per
 * session (who, host, what, start, end, bytes, how it ended, whether the
 * recording is whole).
 *
 * Recorded at the controller, not the proxy: between the controller and
 * the host a session is sealed end to end, so a proxy holds only records
 * it cannot open — the controller is where the plain bytes are. Not on the
 * host either: a recording survives the host.
 */
import type { Database } from "lmdb";
import type { Clock, Timer } from "../common/clock.js";
import { storageError } from "../common/lmdb.js";
import type { Logger } from "../common/logger.js";
import { NotFoundError } from "../common/errors.js";

export type RecordingState = "recording" | "complete" | "cut" | "failed";

/** What a recorded piece costs in the store beyond its bytes (time, direction, channel, connection, framing). */
const PIECE_OVERHEAD_BYTES = 16;

export interface SessionSummary {
  id: string;
  tenant: string;
  operator: string;
  hostId: string;
  proxy: string;
  kind: "session" | "forward";
  what: string;
  startedAt: number;
  endedAt?: number;
  bytesToHost: number;
  bytesFromHost: number;
  outcome: string;
  recording: RecordingState;
}

/** One recorded piece: ms since the start, the direction, the channel, the connection, the bytes. */
export type RecordedEvent = [atMs: number, toHost: boolean, channel: number, conn: number, data: Uint8Array];

export interface RecordingStore {
  putSummary(s: SessionSummary): Promise<void>;
  summary(tenant: string, id: string): SessionSummary | undefined;
  /** A tenant's sessions, newest first (summaries are kept by tenant: listing one never reads another's). */
  summariesNewestFirst(tenant: string): Iterable<SessionSummary>;
  putEvents(id: string, seq: number, events: RecordedEvent[]): Promise<void>;
  events(id: string): Iterable<RecordedEvent[]>;
}

/** The "sessions" and "session-recordings" databases of the controller's LMDB environment. */
export class LmdbRecordingStore implements RecordingStore {
  constructor(
    private readonly summaries: Database<SessionSummary, string>,
    private readonly chunks: Database<RecordedEvent[], string>,
  ) {}
  async putSummary(s: SessionSummary): Promise<void> {
    await this.summaries.put(summaryKey(s.tenant, s.id), s).catch((err: unknown) => Promise.reject(storageError(err)));
  }
  summary(tenant: string, id: string): SessionSummary | undefined {
    return this.summaries.get(summaryKey(tenant, id));
  }
  *summariesNewestFirst(tenant: string): Iterable<SessionSummary> {
    for (const { value } of this.summaries.getRange({ start: `${tenant}\u0001`, end: `${tenant}\u0000`, reverse: true })) yield value;
  }
  async putEvents(id: string, seq: number, events: RecordedEvent[]): Promise<void> {
    await this.chunks.put(chunkKey(id, seq), events).catch((err: unknown) => Promise.reject(storageError(err)));
  }
  *events(id: string): Iterable<RecordedEvent[]> {
    for (const { value } of this.chunks.getRange({ start: chunkKey(id, 0), end: `${id}/~` })) yield value;
  }
}

/** Summaries by tenant, then by (time-ordered) id. */
const summaryKey = (tenant: string, id: string) => `${tenant}\u0000${id}`;
const chunkKey = (id: string, seq: number) => `${id}/${String(seq).padStart(10, "0")}`;

export interface RecorderOptions {
  store: RecordingStore;
  clock: Clock;
  log: Logger;
  /** Bytes recorded per session at most; past it the recording is cut. */
  maxBytes: number;
  /**
   * Why recordings must stop now, if they must: the store they share with
   * jobs and the audit log is filling (checked before each write).
   */
  room?: () => string | undefined;
  /** How long recorded bytes wait to be written with the next ones. Default 200 ms. */
  flushMs?: number;
  /** Bytes that wait at most before they are written. Default 256 KiB. */
  flushBytes?: number;
}

/**
 * One session's recording. `add` never throws: a recording that cannot be
 * stored says so through `failure` (once), and the broker ends the session
 * when the role asks for strict recording.
 */
export class Recording {
  /** Pieces waiting to be written; a piece's bytes as the parts that came in its millisecond, joined once at the write. */
  private pending: { event: RecordedEvent; parts: Uint8Array[] }[] = [];
  private pendingBytes = 0;
  private recorded = 0;
  private seq = 0;
  private timer: Timer | undefined;
  private writes: Promise<void> = Promise.resolve();
  private failed: string | undefined;
  private listeners: ((reason: string) => void)[] = [];

  constructor(
    private readonly opts: RecorderOptions,
    readonly summary: SessionSummary,
  ) {}

  /** Starts the recording: its summary is stored first (a strict session does not start without it). */
  async start(): Promise<void> {
    await this.opts.store.putSummary({ ...this.summary });
  }

  /** Called once, with why, when the recording is cut or cannot be stored. */
  onFailure(fn: (reason: string) => void): void {
    this.listeners.push(fn);
  }

  add(toHost: boolean, channel: number, conn: number, data: Uint8Array): void {
    if (toHost) this.summary.bytesToHost += data.length;
    else this.summary.bytesFromHost += data.length;
    if (this.summary.recording !== "recording") return;
    // What the store holds counts, not only the bytes: each piece costs its time, direction and channel too.
    const cost = data.length + PIECE_OVERHEAD_BYTES;
    if (this.recorded + cost > this.opts.maxBytes) {
      this.summary.recording = "cut";
      this.fail(`the session's recording reached the controller's limit of ${this.opts.maxBytes} bytes`);
      return;
    }
    const at = this.opts.clock.now() - this.summary.startedAt;
    const last = this.pending.at(-1)?.event;
    if (last && last[0] === at && last[1] === toHost && last[2] === channel && last[3] === conn) {
      // Pieces of one millisecond, one way, one channel: one piece (a flood of 1-byte items stores as one).
      this.pending.at(-1)!.parts.push(Buffer.from(data));
      this.recorded += data.length;
    } else {
      this.pending.push({ event: [at, toHost, channel, conn, new Uint8Array()], parts: [Buffer.from(data)] });
      this.recorded += cost;
    }
    this.pendingBytes += data.length;
    if (this.pendingBytes >= (this.opts.flushBytes ?? 256 * 1024)) this.flush();
    else this.timer ??= this.opts.clock.setTimeout(() => this.flush(), this.opts.flushMs ?? 200);
  }

  /** The session ended: what waits is written, then the summary with how it ended. */
  async finish(outcome: string): Promise<void> {
    this.flush();
    await this.writes;
    this.summary.endedAt = this.opts.clock.now();
    this.summary.outcome = outcome;
    if (this.summary.recording === "recording") this.summary.recording = "complete";
    await this.opts.store.putSummary({ ...this.summary }).catch((err: unknown) => this.opts.log.error("storing a session's summary failed", { session: this.summary.id, err }));
  }

  private flush(): void {
    this.timer?.cancel();
    this.timer = undefined;
    if (this.pending.length === 0 || this.summary.recording !== "recording") return;
    const events = this.pending.map(({ event, parts }) => ((event[4] = parts.length === 1 ? parts[0]! : Buffer.concat(parts)), event));
    const seq = this.seq++;
    this.pending = [];
    this.pendingBytes = 0;
    this.writes = this.writes
      .then(() => {
        if (this.summary.recording !== "recording") return;
        // Checked as each write goes (after the writes before it landed), not when it was queued.
        const full = this.opts.room?.();
        if (full) {
          this.summary.recording = "cut";
          this.fail(`the session's recording stopped: ${full}`);
          return;
        }
        return this.opts.store.putEvents(this.summary.id, seq, events);
      })
      .catch((err: unknown) => {
        this.summary.recording = "failed";
        this.opts.log.error("storing a session's recording failed", { session: this.summary.id, err });
        this.fail(`the session's recording cannot be stored: ${err instanceof Error ? err.message : String(err)}`);
      });
  }

  private fail(reason: string): void {
    if (this.failed) return;
    this.failed = reason;
    this.pending = [];
    for (const fn of this.listeners) fn(reason);
  }
}

/** A tenant's sessions, newest first. */
export function listSessions(store: RecordingStore, tenant: string, limit = 100): SessionSummary[] {
  const n = Math.min(Math.max(limit || 100, 1), 1000);
  const out: SessionSummary[] = [];
  for (const s of store.summariesNewestFirst(tenant)) {
    out.push(s);
    if (out.length >= n) break;
  }
  return out;
}

/** A session of the tenant, or NOT_FOUND (another tenant's is not found either). */
export function sessionOf(store: RecordingStore, tenant: string, id: string): SessionSummary {
  const s = id.length <= 64 ? store.summary(tenant, id) : undefined;
  if (!s || s.tenant !== tenant) throw new NotFoundError(`session ${JSON.stringify(id.slice(0, 64))} not found`);
  return s;
}
