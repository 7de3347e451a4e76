/**
 * A session end to end between the controller and the host
 * (docs/sessions.md, "End to end"). The proxy relays a session's bytes;
 * it must not read them (a `sudo` password typed into a shell) nor change
 * them (inject a keystroke, forge output or the exit code). So the two ends
 * agree on a key the proxy never sees and every byte between them travels
 * in records sealed with it:
 *
 * - Key agreement: the controller puts a fresh X25519 public key into the
 *   session order it signs; the host answers on its leg with a fresh X25519
 *   key of its own, signed with its report key (common/host-signing.ts).
 *   Both derive the session key with HKDF-SHA256 from the shared secret,
 *   the session id and both halves. A proxy that swapped either half would
 *   need the controller's or the host's signing key; the keys live only as
 *   long as the session (forward secrecy).
 * - Records: AES-256-GCM, the nonce being the stream and the record's
 *   number in it. Three streams: data to the host (stdin, eof), data from
 *   the host (stdout, stderr, exit), and the controller's urgent stream
 *   (start, resize, signal), which goes at once instead of in turn with the
 *   data. A record altered, moved, repeated or left out does not open, and
 *   the session ends (DATA_LOSS): a proxy can delay or drop a session, never
 *   forge one.
 * - On the hop, the data streams are bytes on channel SEALED, each record a
 *   4-byte length and its sealed bytes; a relay may cut them anywhere (its
 *   credit windows do), the receiving end puts the records together again.
 *
 * {@link SealedPort} does this over a hop's {@link SessionPort} and offers
 * what the port offers, in plain records, so that the relay at the
 * controller and the bridge at the host work the same on either.
 */
import { createCipheriv, createDecipheriv, createHmac, hkdfSync, timingSafeEqual } from "node:crypto";
import { sharedSecret, X25519_KEY_BYTES, type KeyHalf } from "./x25519.js";
export { newKeyHalf, type KeyHalf } from "./x25519.js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { InvalidArgumentError } from "./errors.js";
import { checkConnEvent, checkWindowSize, isSessionSignal, SESSION_SIGNALS } from "./session-frames.js";
import { ENDED_OK, endOf, tooManyEvents, type SessionEnd, type SessionHandlers, type SessionSide } from "./session-port.js";
import type { Clock, Timer } from "./clock.js";
import { formatDuration } from "./duration.js";
import { LIMITS, preview } from "./limits.js";
import {
  SealedRecordSchema,
  SessionChannel,
  SessionOpenedSchema,
  SessionResumeSchema,
  type SealedRecord,
  type SessionConn,
  type SessionExit,
  type SessionFrame,
  type SessionResume,
  type WindowSize,
} from "../gen/rexmesh/v1/session_pb.js";

/** Plain bytes of one data record at most: a relay's credit window (256 KiB) holds many. */
export const RECORD_DATA_BYTES = 16 * 1024;
/** GCM tag, and room for a record's protobuf framing around its data. */
const TAG_BYTES = 16;
const RECORD_FRAMING_BYTES = 64;
/** Sealed bytes of one record at most (a longer length is refused before anything is buffered). */
export const RECORD_SEALED_BYTES = RECORD_DATA_BYTES + RECORD_FRAMING_BYTES + TAG_BYTES;
/** Sealed bytes of one record at least: the tag and the smallest record (one field, two bytes). */
const RECORD_SEALED_MIN = TAG_BYTES + 2;

/** The three record streams of a session; the id is the first part of each record's nonce. */
export const enum RecordStream {
  ToHost = 0,
  Urgent = 1,
  FromHost = 2,
}

/**
 * The session key: HKDF-SHA256 over the X25519 shared secret, bound to the
 * session id and both public halves. Throws InvalidArgumentError on a
 * public key that is not 32 bytes (or is a low-order point: Node refuses it).
 */
export function sessionSecret(own: KeyHalf, peerPublicKey: Uint8Array, sessionId: string, controllerKey: Uint8Array, hostKey: Uint8Array): Buffer {
  if (peerPublicKey.length !== X25519_KEY_BYTES) throw new InvalidArgumentError(`a session key half of ${peerPublicKey.length} bytes (X25519 keys are 32)`);
  const shared = sharedSecret(own.privateKey, peerPublicKey);
  if (!shared) throw new InvalidArgumentError("the session's key half is not a usable X25519 key");
  const info = Buffer.concat([Buffer.from("rexmesh session key v1\0"), Buffer.from(controllerKey), Buffer.from(hostKey)]);
  return Buffer.from(hkdfSync("sha256", shared, Buffer.from(sessionId, "utf8"), info, 32));
}

function nonce(stream: RecordStream, n: number): Buffer {
  const iv = Buffer.alloc(12);
  iv.writeUInt32BE(stream, 0);
  iv.writeBigUInt64BE(BigInt(n), 4);
  return iv;
}

/** A record that does not open: what the end sees of a proxy that changed, moved or dropped one. */
function notOpened(what: string): ConnectError {
  return new ConnectError(`a sealed ${what} record of the session did not open: it was altered, moved or left out on the way, or is not from the session's other end`, Code.DataLoss);
}

/** A place in one record stream: its key, and the number (the nonce) of the next record. */
abstract class StreamPosition {
  protected next = 0;

  constructor(
    protected readonly key: Buffer,
    protected readonly stream: RecordStream,
  ) {}

  /** Records sealed (or opened) so far. */
  get count(): number {
    return this.next;
  }

  protected nonce(): Buffer {
    return nonce(this.stream, this.next);
  }
}

/** Seals the records of one stream, in order. */
export class RecordSealer extends StreamPosition {
  /** The sealed record (ciphertext and tag); with `framed`, preceded by its 4-byte length, as the data streams carry it. */
  seal(record: SealedRecord, framed: boolean): Uint8Array {
    const plain = toBinary(SealedRecordSchema, record);
    const cipher = createCipheriv("aes-256-gcm", this.key, this.nonce());
    this.next++;
    const parts = [cipher.update(plain), cipher.final(), cipher.getAuthTag()];
    if (framed) {
      const head = Buffer.allocUnsafe(4);
      head.writeUInt32BE(plain.length + TAG_BYTES);
      parts.unshift(head);
    }
    // One copy into the record: the length, the ciphertext and the tag.
    return Buffer.concat(parts);
  }
}

/** Opens the records of one stream, in order; the first that does not open ends it. */
export class RecordOpener extends StreamPosition {
  constructor(
    key: Buffer,
    stream: RecordStream,
    private readonly what: string,
  ) {
    super(key, stream);
  }

  open(sealed: Uint8Array): SealedRecord {
    if (sealed.length < TAG_BYTES) throw notOpened(this.what);
    const decipher = createDecipheriv("aes-256-gcm", this.key, this.nonce());
    decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
    let plain: Buffer;
    try {
      plain = Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES)), decipher.final()]);
    } catch {
      throw notOpened(this.what);
    }
    this.next++;
    return fromBinary(SealedRecordSchema, plain);
  }
}

/**
 * Puts a data stream's records together again from the pieces a hop
 * delivers: each is a 4-byte length and that many sealed bytes.
 */
export class RecordAssembler {
  private readonly pieces: Buffer[] = [];
  /** Bytes of pieces[0] already taken. */
  private offset = 0;
  private held = 0;
  /** Bytes of the record being put together, its length included, once its length is known. */
  private need: number | undefined;

  /** Takes a piece; returns every record now complete (its sealed bytes, without the length). */
  push(piece: Uint8Array): Buffer[] {
    if (piece.length > 0) this.pieces.push(Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength));
    this.held += piece.length;
    const out: Buffer[] = [];
    for (;;) {
      if (this.need === undefined) {
        if (this.held < 4) break;
        const len = this.take(4).readUInt32BE(0);
        if (len > RECORD_SEALED_BYTES) throw new InvalidArgumentError(`a sealed session record of ${len} bytes (at most ${RECORD_SEALED_BYTES})`);
        if (len < RECORD_SEALED_MIN) throw new InvalidArgumentError(`a sealed session record of ${len} bytes (at least ${RECORD_SEALED_MIN})`);
        this.need = len;
      }
      if (this.held < this.need) break;
      out.push(this.take(this.need));
      this.need = undefined;
    }
    return out;
  }

  /** Bytes held of a record not complete yet. */
  get pending(): number {
    return this.held + (this.need === undefined ? 0 : 4);
  }

  /** The next `n` bytes held, in a buffer of their own: each byte is copied once, what stays is not moved. */
  private take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const first = this.pieces[0]!;
      const k = Math.min(n - filled, first.length - this.offset);
      first.copy(out, filled, this.offset, this.offset + k);
      filled += k;
      this.offset += k;
      if (this.offset === first.length) {
        this.pieces.shift();
        this.offset = 0;
      }
    }
    this.held -= n;
    return out;
  }
}

/** A record sealed into a stream and kept until the other end has opened it. */
interface KeptRecord {
  /** Its number in its stream. */
  n: number;
  bytes: Uint8Array;
  /** Told once the record has left whole on a hop, the first time (a relay's credit, a connection event's count). */
  sent?: () => void;
  /** Counted in {@link Unopened.inFlight}: it left whole on the current hop. */
  onHop: boolean;
}

/**
 * The records of one stream the other end has not opened yet, in order:
 * what a resumed leg sends again. The other end's count of opened records
 * lets them go; it may count only records that have left on the hop.
 */
class Unopened {
  /** The number of items[0]: every record before it was opened. */
  first = 0;
  readonly items: KeptRecord[] = [];
  /** Bytes of every record kept. */
  bytes = 0;
  /** Bytes of the records kept that have left on the current hop: what the other end holds back by not saying it opened them. */
  inFlight = 0;
  /** Records, counted from the stream's start, that have left whole on the current hop (or were opened before it). */
  private sentEnd = 0;

  constructor(private readonly what: string) {}

  push(r: KeptRecord): void {
    this.items.push(r);
    this.bytes += r.bytes.length;
  }

  /** Records sealed in all. */
  get end(): number {
    return this.first + this.items.length;
  }

  /** A record left whole on the current hop (they leave in order). */
  left(r: KeptRecord): void {
    this.sentEnd = Math.max(this.sentEnd, r.n + 1);
    if (r.onHop) return;
    r.onHop = true;
    this.inFlight += r.bytes.length;
  }

  /** A new hop: every record kept is sent on it again. */
  newHop(): void {
    this.sentEnd = this.first;
    this.inFlight = 0;
    for (const r of this.items) r.onHop = false;
  }

  /**
   * The other end has opened `count` records of the stream: they are let
   * go. On a hop (`resume` false) the count may not pass the records that
   * have left on it (a relay that claimed more would have the sender drop,
   * and credit again, what it never sent), and an older one is ignored. On
   * a resume it must lie between the records let go and those sealed. A
   * count out of bounds ends the session, DATA_LOSS.
   */
  openedUpTo(count: bigint, resume: boolean): void {
    const n = Number(count);
    const most = resume ? this.end : this.sentEnd;
    if (n > most) throw new ConnectError(`the session's other end says it opened ${count} ${this.what} records, but ${resume ? "the stream has" : "the hop carried"} only ${most}`, Code.DataLoss);
    if (n < this.first) {
      if (resume) throw new ConnectError(`the session's other end resumes after ${count} ${this.what} records, but said before it had opened ${this.first}`, Code.DataLoss);
      return;
    }
    while (this.first < n) {
      const r = this.items.shift()!;
      this.bytes -= r.bytes.length;
      if (r.onHop) this.inFlight -= r.bytes.length;
      this.first++;
      // Opened, so it left whole on some hop, which has told `sent` already; a record is never left owing credit.
      const sent = r.sent;
      r.sent = undefined;
      sent?.();
    }
    this.sentEnd = Math.max(this.sentEnd, this.first);
  }
}

/** What a sealed port needs of its hop: a port of a sealed hop. */
export type SealedHop = Required<Pick<SessionSide, "sendUrgent" | "sendOpened">> & SessionSide & { readonly isEnded?: boolean };

/** A port that outlives a cut hop (docs/sessions.md, "Resume"). */
export interface ResumeOptions {
  clock: Clock;
  /** How long the session waits for a new leg after its leg was cut; 0: a cut ends it. */
  windowMs: number;
  /** The leg was cut and the session waits for a new one (the host dials it). */
  onCut?(end: SessionEnd): void;
}

/** Records opened after which their count goes back in a frame of its own, if none went meanwhile. */
const OPENED_EVERY = 16;

/**
 * One end of a session's sealed leg (the controller's side of its hop to
 * the proxy, or the host's side of its hop): seals what is sent and opens
 * what arrives, over the hop's port, and offers what the port offers, in
 * plain records, so that the relay at the controller and the bridge at the
 * host work the same on either. Credit stays the port's: a record's bytes
 * on the hop are consumed once its plain data was taken.
 *
 * Every record sealed is kept until the other end says it opened it
 * (SessionFrame.opened). With {@link ResumeOptions}, a hop that is cut
 * (its proxy restarted, or lost the other leg) does not end the session:
 * the port waits for a new hop, on which each end sends again every record
 * the other has not opened — nothing lost, nothing twice — and goes on.
 */
export class SealedPort implements SessionSide {
  readonly ended: Promise<SessionEnd>;
  private resolveEnded!: (end: SessionEnd) => void;
  private port: SealedHop | undefined;
  private readonly data: RecordSealer;
  private readonly urgent: RecordSealer | undefined;
  private readonly openData: RecordOpener;
  private readonly openUrgent: RecordOpener | undefined;
  private readonly dataKept: Unopened;
  private readonly urgentKept: Unopened | undefined;
  private readonly resumeKey: Buffer;
  private assembler = new RecordAssembler();
  /** Data records handed over and not yet consumed in full: their plain bytes left, their bytes on the hop, and that hop. */
  private readonly unconsumed: { plain: number; hop: number; port: SealedHop }[] = [];
  private handlers: SessionHandlers | undefined;
  private keepaliveMs: number | undefined;
  private started = false;
  private exitSeen = false;
  private eofSeen = false;
  private finished = false;
  /** An OK end asked for: it goes once the other end has opened every record (the host's exit among them). */
  private closing: SessionEnd | undefined;
  /** Bounds the wait for that: a relay that never passes on the count does not hold the session (and what it left running) open. */
  private closingTimer: Timer | undefined;
  /** While the hop is cut: the timer that ends the session unless a new hop comes first. */
  private pauseTimer: Timer | undefined;
  /** Resolved when a new hop is attached or the session ends. */
  private nextHop: { promise: Promise<void>; resolve: () => void } | undefined;
  /** Records opened since their count last went back on its own. */
  private openedUnsaid = 0;
  /** The host's attempts to resume (host), the highest taken (controller). */
  private attempts = 0;
  /** The controller's resize and signals not sealed yet: a burst is sealed once per turn, the latest size only. */
  private readonly urgentWaiting: { resize?: WindowSize; signals: string[] } = { signals: [] };
  private urgentScheduled = false;
  /** Connection event records queued and not yet sent whole. */
  private eventsWaiting = 0;

  constructor(
    port: SealedHop,
    key: Buffer,
    private readonly side: "controller" | "host",
    private readonly resumable?: ResumeOptions,
  ) {
    const controller = side === "controller";
    this.ended = new Promise((r) => (this.resolveEnded = r));
    this.resumeKey = Buffer.from(hkdfSync("sha256", key, Buffer.alloc(0), "rexmesh session resume v1", 32));
    this.data = new RecordSealer(key, controller ? RecordStream.ToHost : RecordStream.FromHost);
    this.dataKept = new Unopened(controller ? "input" : "output");
    this.openData = new RecordOpener(key, controller ? RecordStream.FromHost : RecordStream.ToHost, controller ? "output" : "input");
    if (controller) {
      this.urgent = new RecordSealer(key, RecordStream.Urgent);
      this.urgentKept = new Unopened("control");
      // The urgent stream's first record, before anything else can be sealed in it; it goes when the port starts.
      this.urgentKept.push({ n: 0, bytes: this.urgent.seal(create(SealedRecordSchema, { start: true }), false), onHop: false });
    } else {
      this.openUrgent = new RecordOpener(key, RecordStream.Urgent, "control");
    }
    this.port = port;
  }

  /** Bytes waiting to leave: on the hop, or all those kept while the hop is cut. */
  get queuedBytes(): number {
    return this.port && !this.port.isEnded ? this.port.queuedBytes : this.dataKept.bytes;
  }

  /** Whether records are kept until opened: a session that can resume (an older peer's cannot: it never says what it opened). */
  private get keeps(): boolean {
    return (this.resumable?.windowMs ?? 0) > 0;
  }

  /** Whether the hop is cut and the session waits for a new one. */
  get paused(): boolean {
    return this.pauseTimer !== undefined;
  }

  async whenQueueBelow(bytes: number): Promise<void> {
    for (;;) {
      if (this.finished) return;
      const port = this.port;
      if (!port || port.isEnded) {
        await this.waitForHop();
        continue;
      }
      await port.whenQueueBelow(bytes);
      if (this.port === port && !port.isEnded) return;
    }
  }

  /**
   * Starts the hop. The controller's side sends the urgent stream's first
   * record, start, at once; the host's side calls `handlers.start` when it
   * arrives, and refuses anything else before it.
   */
  start(handlers: SessionHandlers, first?: SessionFrame, keepaliveMs?: number): void {
    this.handlers = handlers;
    this.keepaliveMs = keepaliveMs;
    this.attach(this.port!, first);
    for (const r of this.urgentKept?.items ?? []) this.sendUrgentRecord(r);
    if (!this.keeps) this.urgentKept?.openedUpTo(BigInt(this.urgentKept.end), true);
  }

  sendData(channel: SessionChannel, bytes: Uint8Array, onSent?: (n: number) => void, conn = 0): void {
    for (let at = 0; at < bytes.length; at += RECORD_DATA_BYTES) {
      const piece = bytes.subarray(at, Math.min(bytes.length, at + RECORD_DATA_BYTES));
      this.keepData(this.data.seal(create(SealedRecordSchema, { channel, data: piece, conn }), true), onSent && (() => onSent(piece.length)));
    }
  }

  sendResize(size: WindowSize): void {
    this.urgentWaiting.resize = size;
    this.sealUrgentSoon();
  }

  /** A signal for the process group; past 8 waiting in one turn, more are dropped (as a terminal's line discipline would merge them). */
  sendSignal(name: string): void {
    if (this.urgentWaiting.signals.length < 8) this.urgentWaiting.signals.push(name);
    this.sealUrgentSoon();
  }

  sendEof(): void {
    this.keepData(this.data.seal(create(SealedRecordSchema, { eof: true }), true));
  }

  /** A connection event, sealed into the data stream; with too many waiting, the session ends (see SessionPort.sendConn). */
  sendConn(event: SessionConn): void {
    if (this.finished) return;
    if (this.eventsWaiting >= LIMITS.sessionQueuedConnEvents) {
      this.end(tooManyEvents());
      return;
    }
    this.eventsWaiting++;
    this.keepData(this.data.seal(create(SealedRecordSchema, { connEvent: event }), true), () => this.eventsWaiting--);
  }

  sendExit(exit: SessionExit): void {
    this.keepData(this.data.seal(create(SealedRecordSchema, { exit }), true));
  }

  consumed(n: number): void {
    let left = n;
    while (left > 0) {
      const head = this.unconsumed[0];
      if (!head) throw new Error(`internal: ${n} bytes consumed of session data never handed over`);
      const k = Math.min(left, head.plain);
      head.plain -= k;
      left -= k;
      if (head.plain === 0) {
        this.unconsumed.shift();
        head.port.consumed(head.hop);
      }
    }
  }

  /**
   * Ends the session. An error ends it at once; OK (the host, after the
   * exit) once the other end has opened every record sealed here, so that
   * a hop cut before then is resumed to deliver them.
   */
  end(end: SessionEnd): void {
    if (this.finished) return;
    if (end.code === 0) {
      if (this.closing) return;
      this.closing = end;
      if (this.keeps) {
        this.closingTimer = this.resumable!.clock.setTimeout(() => {
          const port = this.port;
          this.port = undefined;
          port?.end(end);
          this.finish(end);
        }, this.resumable!.windowMs);
      }
      this.closeIfOpened();
      return;
    }
    const port = this.port;
    this.port = undefined;
    port?.end(end);
    this.finish(end);
  }

  // ---- resume (docs/sessions.md, "Resume") ------------------------------------

  /** The host: what its new leg asks with (a fresh attempt each time). */
  resumeRequest(): SessionResume {
    const attempt = ++this.attempts;
    const dataOpened = BigInt(this.openData.count);
    const urgentOpened = BigInt(this.openUrgent?.count ?? 0);
    return create(SessionResumeSchema, { dataOpened, urgentOpened, attempt, mac: this.resumeMac("host", attempt, dataOpened, urgentOpened) });
  }

  /**
   * The controller: checks a request to resume, and answers it. PERMISSION_DENIED
   * for one the host did not make with the session's key, or that was taken before.
   */
  acceptResume(req: SessionResume): SessionResume {
    if (this.finished) throw new ConnectError("the session has ended", Code.NotFound);
    if (!macEqual(req.mac, this.resumeMac("host", req.attempt, req.dataOpened, req.urgentOpened))) throw new ConnectError("the request to resume the session was not made by its host", Code.PermissionDenied);
    if (req.attempt <= this.attempts) throw new ConnectError(`attempt ${req.attempt} to resume the session is not newer than attempt ${this.attempts}, taken before`, Code.PermissionDenied);
    this.attempts = req.attempt;
    const dataOpened = BigInt(this.openData.count);
    return create(SessionResumeSchema, { dataOpened, attempt: req.attempt, mac: this.resumeMac("controller", req.attempt, dataOpened, 0n) });
  }

  /** The host: checks the controller's answer to its request. */
  checkResumed(answer: SessionResume): void {
    if (answer.attempt !== this.attempts || answer.urgentOpened !== 0n || !macEqual(answer.mac, this.resumeMac("controller", answer.attempt, answer.dataOpened, 0n))) {
      throw new ConnectError("the answer to resume the session is not the controller's", Code.PermissionDenied);
    }
  }

  /**
   * Takes up the session on a new hop, `peer` being the other end's counts
   * (its request, or its answer, checked): the records it has not opened
   * are sent again, the urgent ones first as they went first, and the
   * session goes on. A hop still attached is let go. Counts that do not fit
   * what was sealed end the session, DATA_LOSS.
   */
  resume(port: SealedHop, peer: SessionResume, first?: SessionFrame): void {
    if (this.finished) {
      port.start({ data: () => undefined });
      port.end({ code: Code.NotFound, message: "the session has ended" });
      return;
    }
    const old = this.port;
    this.port = undefined;
    old?.end({ code: Code.Aborted, message: "a new leg took up the session" });
    try {
      this.dataKept.openedUpTo(peer.dataOpened, true);
      this.urgentKept?.openedUpTo(peer.urgentOpened, true);
    } catch (err) {
      port.start({ data: () => undefined });
      const end = endOf(err, "other end");
      port.end(end);
      this.finish(end);
      return;
    }
    this.pauseTimer?.cancel();
    this.pauseTimer = undefined;
    this.dataKept.newHop();
    this.attach(port, first);
    // The urgent records first, as they went first; the port sends every urgent record waiting before any data.
    this.urgentKept?.newHop();
    for (const r of this.urgentKept?.items ?? []) this.sendUrgentRecord(r);
    for (const r of this.dataKept.items) this.transmit(r);
    // Resizes and signals given while the hop was cut are sealed now (the latest size only).
    if (this.urgentWaiting.resize || this.urgentWaiting.signals.length > 0) this.sealUrgentSoon();
    this.wakeHopWaiters();
    this.closeIfOpened();
  }

  private resumeMac(side: "host" | "controller", attempt: number, dataOpened: bigint, urgentOpened: bigint): Buffer {
    const fields = Buffer.alloc(4 + 8 + 8);
    fields.writeUInt32BE(attempt, 0);
    fields.writeBigUInt64BE(BigInt.asUintN(64, dataOpened), 4);
    fields.writeBigUInt64BE(BigInt.asUintN(64, urgentOpened), 12);
    return createHmac("sha256", this.resumeKey).update(`rexmesh session resume\0${side}\0`).update(fields).digest();
  }

  // ---- the hop -----------------------------------------------------------------

  private attach(port: SealedHop, first: SessionFrame | undefined): void {
    this.port = port;
    this.assembler = new RecordAssembler();
    port.start(
      {
        data: (channel, bytes) => this.received(port, channel, bytes),
        urgent: (sealed) => this.receivedUrgent(port, sealed),
        opened: (o) => {
          if (this.port !== port || !this.keeps) return;
          this.dataKept.openedUpTo(o.data, false);
          this.urgentKept?.openedUpTo(o.urgent, false);
          this.closeIfOpened();
        },
      },
      first,
      this.keepaliveMs,
    );
    port.ended.then((end) => this.hopEnded(port, end)).catch(() => undefined);
  }

  private hopEnded(port: SealedHop, end: SessionEnd): void {
    if (port !== this.port || this.finished) return;
    this.port = undefined;
    const r = this.resumable;
    // The controller that has the host's sealed exit has all of the session: a cut now is its end.
    if (end.cut && this.side === "controller" && this.exitSeen) {
      this.finish(ENDED_OK);
      return;
    }
    if (!end.cut || !r || r.windowMs <= 0) {
      this.finish(end);
      return;
    }
    this.pauseTimer = r.clock.setTimeout(() => {
      this.pauseTimer = undefined;
      this.finish({ code: end.code === 0 ? Code.Unavailable : end.code, message: `${end.message}; the session did not resume within ${formatDuration(r.windowMs)}` });
    }, r.windowMs);
    r.onCut?.(end);
  }

  private finish(end: SessionEnd): void {
    if (this.finished) return;
    this.finished = true;
    this.pauseTimer?.cancel();
    this.pauseTimer = undefined;
    this.closingTimer?.cancel();
    this.wakeHopWaiters();
    // The controller counts a session that its other hop ended "OK" without the host's sealed exit as cut off:
    // an OK close is the proxy's word, the exit is the host's.
    const controller = this.side === "controller";
    this.resolveEnded(
      end.code === 0 && controller && !this.exitSeen
        ? { code: Code.Unavailable, message: "the session's leg closed without the host's exit: the host or its proxy ended it" }
        : { code: end.code, message: end.message },
    );
  }

  private waitForHop(): Promise<void> {
    if (!this.nextHop) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      this.nextHop = { promise, resolve };
    }
    return this.nextHop.promise;
  }

  private wakeHopWaiters(): void {
    const w = this.nextHop;
    this.nextHop = undefined;
    w?.resolve();
  }

  /** An OK end waiting for the other end to open every record goes now, if it has. */
  private closeIfOpened(): void {
    if (this.closing && this.port && (!this.keeps || this.dataKept.items.length === 0)) this.port.end(this.closing);
  }

  private keepData(bytes: Uint8Array, sent?: () => void): void {
    if (this.finished) return;
    const r: KeptRecord = { n: this.dataKept.end, bytes, sent, onHop: false };
    // Without resume nothing is kept: the record only goes on the hop.
    if (this.keeps) this.dataKept.push(r);
    if (this.port) this.transmit(r);
  }

  private keepUrgent(sealed: Uint8Array): void {
    if (this.finished) return;
    if (!this.keeps) {
      this.port?.sendUrgent(sealed);
      return;
    }
    const r: KeptRecord = { n: this.urgentKept!.end, bytes: sealed, onHop: false };
    this.urgentKept!.push(r);
    if (this.urgentKept!.items.length > LIMITS.sessionUnopenedControl) {
      this.end({ code: Code.ResourceExhausted, message: `more than ${LIMITS.sessionUnopenedControl} resizes and signals of the session wait for the host to open them` });
      return;
    }
    if (this.port) this.sendUrgentRecord(r);
  }

  /** An urgent record on the hop: it goes at once (the port holds it for the turn at most). */
  private sendUrgentRecord(r: KeptRecord): void {
    this.port!.sendUrgent(r.bytes);
    this.urgentKept!.left(r);
  }

  /**
   * Sends a kept record on the hop; `sent` is told once it has left whole,
   * the first time. Records that left and wait to be opened are bounded
   * (sessionUnopenedBytes): a relay that takes them and never says they
   * were opened ends the session rather than fill this end's memory.
   */
  private transmit(r: KeptRecord): void {
    let left = r.bytes.length;
    this.port!.sendData(SessionChannel.SEALED, r.bytes, (n) => {
      left -= n;
      if (left > 0) return;
      if (this.keeps) {
        this.dataKept.left(r);
        if (this.dataKept.inFlight > LIMITS.sessionUnopenedBytes) {
          // Not from within the port's flush: the end goes a moment later.
          queueMicrotask(() => this.end({ code: Code.ResourceExhausted, message: `more than ${LIMITS.sessionUnopenedBytes} bytes of the session went to its other end without it saying it opened them` }));
        }
      }
      const sent = r.sent;
      r.sent = undefined;
      sent?.();
    });
  }

  /** Tells the other end how far this one has opened: in a frame of its own every few records or after an ending one. */
  private sayOpened(ending: boolean): void {
    const now = ending || ++this.openedUnsaid >= OPENED_EVERY;
    if (now) this.openedUnsaid = 0;
    this.port?.sendOpened(create(SessionOpenedSchema, { data: BigInt(this.openData.count), urgent: BigInt(this.openUrgent?.count ?? 0) }), now);
  }

  private sealUrgentSoon(): void {
    if (!this.urgent) throw new Error("internal: only the controller's side sends urgent records");
    if (this.urgentScheduled) return;
    this.urgentScheduled = true;
    setImmediate(() => {
      this.urgentScheduled = false;
      // While the hop is cut they wait unsealed, the latest size only: a pause does not pile up records.
      if (!this.port && this.keeps && !this.finished) return;
      const { resize, signals } = this.urgentWaiting;
      this.urgentWaiting.resize = undefined;
      const records = [...(resize ? [create(SealedRecordSchema, { resize })] : []), ...signals.splice(0).map((signal) => create(SealedRecordSchema, { signal }))];
      // Each says how much of the data stream went before it: the host refuses one held back past later input.
      for (const r of records) {
        r.after = BigInt(this.data.count);
        this.keepUrgent(this.urgent!.seal(r, false));
      }
    });
  }

  private received(port: SealedHop, channel: SessionChannel, piece: Uint8Array): void {
    if (port !== this.port) return;
    if (channel !== SessionChannel.SEALED) throw new InvalidArgumentError(`plain session data (channel ${channel}) on a sealed hop`);
    for (const sealed of this.assembler.push(piece)) {
      const hop = 4 + sealed.length;
      const record = this.openData.open(sealed);
      this.take(record, hop, port);
    }
  }

  private take(record: SealedRecord, hop: number, port: SealedHop): void {
    const h = this.handlers!;
    const fromHost = this.side === "controller";
    const kinds =
      (record.data.length > 0 ? 1 : 0) + (record.eof ? 1 : 0) + (record.exit ? 1 : 0) + (record.resize ? 1 : 0) + (record.signal !== "" ? 1 : 0) + (record.start ? 1 : 0) + (record.connEvent ? 1 : 0);
    if (kinds !== 1) throw new InvalidArgumentError("a sealed session record must hold exactly one thing");
    if (!fromHost && !this.started) throw new InvalidArgumentError("session input before the controller started the session");
    if (this.exitSeen || this.eofSeen) throw new InvalidArgumentError(`a sealed session record after the ${this.exitSeen ? "exit" : "end of input"}`);
    this.sayOpened(record.exit !== undefined || record.eof);
    if (record.data.length > 0) {
      const ok = fromHost ? record.channel === SessionChannel.STDOUT || record.channel === SessionChannel.STDERR : record.channel === SessionChannel.STDIN;
      if (!ok && record.channel !== SessionChannel.CONN) throw new InvalidArgumentError(`sealed session data on channel ${record.channel}, which the ${fromHost ? "host" : "controller"} does not send`);
      if ((record.channel === SessionChannel.CONN) !== (record.conn !== 0)) throw new InvalidArgumentError("sealed session data names a connection exactly when it is on channel CONN");
      this.unconsumed.push({ plain: record.data.length, hop, port });
      h.data(record.channel, record.data, record.conn);
      return;
    }
    port.consumed(hop);
    if (record.connEvent) {
      checkConnEvent(record.connEvent, fromHost ? "output" : "input");
      if (!h.conn) throw new InvalidArgumentError("a connection event in a session that forwards no port");
      h.conn(record.connEvent);
      return;
    }
    if (record.eof && !fromHost) {
      this.eofSeen = true;
      h.eof?.();
    } else if (record.exit && fromHost) {
      if (record.exit.signal.length > 32) throw new InvalidArgumentError("an exit's signal name is longer than 32 characters");
      this.exitSeen = true;
      h.exit?.(record.exit);
    } else {
      throw new InvalidArgumentError(`a sealed session record the ${fromHost ? "host" : "controller"} does not send in its data stream`);
    }
  }

  private receivedUrgent(port: SealedHop, sealed: Uint8Array): void {
    if (port !== this.port) return;
    if (!this.openUrgent) throw new InvalidArgumentError("urgent session records come only from the controller's side");
    const record = this.openUrgent.open(sealed);
    const h = this.handlers!;
    this.sayOpened(false);
    if (!this.started) {
      if (!record.start) throw new InvalidArgumentError("the controller's first urgent record must start the session");
      this.started = true;
      h.start?.();
      return;
    }
    if (record.after < BigInt(this.openData.count)) {
      throw new ConnectError("a sealed control record of the session came after input sealed later than it: it was held back on the way", Code.DataLoss);
    }
    if (record.resize) {
      checkWindowSize(record.resize.cols, record.resize.rows);
      h.resize?.(record.resize);
    } else if (record.signal !== "") {
      if (!isSessionSignal(record.signal)) throw new InvalidArgumentError(`signal ${preview(record.signal)} is not one a session passes on (${SESSION_SIGNALS.join(", ")})`);
      h.signal?.(record.signal);
    } else {
      throw new InvalidArgumentError("an urgent session record that is neither a resize nor a signal");
    }
  }
}

/** Two MACs equal, in time that does not depend on where they differ. */
function macEqual(a: Uint8Array, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
