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
import { createCipheriv, createDecipheriv, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, type KeyObject } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { InvalidArgumentError } from "./errors.js";
import { checkConnEvent, checkWindowSize, isSessionSignal, SESSION_SIGNALS } from "./session-frames.js";
import { tooManyEvents, type SessionEnd, type SessionHandlers, type SessionSide } from "./session-port.js";
import { LIMITS, preview } from "./limits.js";
import { SealedRecordSchema, SessionChannel, type SealedRecord, type SessionConn, type SessionExit, type SessionFrame, type WindowSize } from "../gen/rexmesh/v1/session_pb.js";

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

/** One end's half of the key agreement: an X25519 key pair made for one session. */
export interface KeyHalf {
  /** Raw public key, 32 bytes: what goes to the other end. */
  publicKey: Uint8Array;
  privateKey: KeyObject;
}

export function newKeyHalf(): KeyHalf {
  const { publicKey, privateKey } = generateKeyPairSync("x25519");
  const jwk = publicKey.export({ format: "jwk" });
  return { publicKey: Buffer.from(jwk.x!, "base64url"), privateKey };
}

/**
 * The session key: HKDF-SHA256 over the X25519 shared secret, bound to the
 * session id and both public halves. Throws InvalidArgumentError on a
 * public key that is not 32 bytes (or is a low-order point: Node refuses it).
 */
export function sessionSecret(own: KeyHalf, peerPublicKey: Uint8Array, sessionId: string, controllerKey: Uint8Array, hostKey: Uint8Array): Buffer {
  if (peerPublicKey.length !== 32) throw new InvalidArgumentError(`a session key half of ${peerPublicKey.length} bytes (X25519 keys are 32)`);
  let shared: Buffer;
  try {
    const peer = createPublicKey({ key: { kty: "OKP", crv: "X25519", x: Buffer.from(peerPublicKey).toString("base64url") }, format: "jwk" });
    shared = diffieHellman({ privateKey: own.privateKey, publicKey: peer });
  } catch {
    throw new InvalidArgumentError("the session's key half is not a usable X25519 key");
  }
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

/**
 * One end of a session's sealed hop (the controller's side of its leg to
 * the proxy, or the host's side of its leg): seals what is sent and opens
 * what arrives, over the hop's port. Credit stays the port's: a record's
 * bytes on the hop are consumed once its plain data was taken.
 */
export class SealedPort implements SessionSide {
  readonly ended: Promise<SessionEnd>;
  private readonly data: RecordSealer;
  private readonly urgent: RecordSealer | undefined;
  private readonly openData: RecordOpener;
  private readonly openUrgent: RecordOpener | undefined;
  private readonly assembler = new RecordAssembler();
  /** Data records handed over and not yet consumed in full: their plain bytes left, and their bytes on the hop. */
  private readonly unconsumed: { plain: number; hop: number }[] = [];
  private handlers: SessionHandlers | undefined;
  private started = false;
  private exitSeen = false;
  private eofSeen = false;
  /** The controller's resize and signals not sealed yet: a burst is sealed once per turn, the latest size only. */
  private readonly urgentWaiting: { resize?: WindowSize; signals: string[] } = { signals: [] };
  private urgentScheduled = false;
  /** Connection event records queued on the port and not yet sent whole. */
  private eventsWaiting = 0;

  constructor(
    private readonly port: Required<Pick<SessionSide, "sendUrgent">> & SessionSide,
    key: Buffer,
    private readonly side: "controller" | "host",
  ) {
    const controller = side === "controller";
    this.data = new RecordSealer(key, controller ? RecordStream.ToHost : RecordStream.FromHost);
    this.openData = new RecordOpener(key, controller ? RecordStream.FromHost : RecordStream.ToHost, controller ? "output" : "input");
    if (controller) {
      this.urgent = new RecordSealer(key, RecordStream.Urgent);
      // The urgent stream's first record, before anything else can be sealed in it.
      port.sendUrgent(this.urgent.seal(create(SealedRecordSchema, { start: true }), false));
    } else {
      this.openUrgent = new RecordOpener(key, RecordStream.Urgent, "control");
    }
    // The controller counts a session that its other hop ended "OK" without the host's sealed exit as cut off:
    // an OK close is the proxy's word, the exit is the host's.
    this.ended = port.ended.then((end) =>
      end.code === 0 && controller && !this.exitSeen ? { code: Code.Unavailable, message: "the session's leg closed without the host's exit: the host or its proxy ended it" } : end,
    );
  }

  get queuedBytes(): number {
    return this.port.queuedBytes;
  }

  whenQueueBelow(bytes: number): Promise<void> {
    return this.port.whenQueueBelow(bytes);
  }

  /**
   * Starts the hop. The controller's side sends the urgent stream's first
   * record, start, at once; the host's side calls `handlers.start` when it
   * arrives, and refuses anything else before it.
   */
  start(handlers: SessionHandlers, first?: SessionFrame, keepaliveMs?: number): void {
    this.handlers = handlers;
    this.port.start({ data: (channel, bytes) => this.received(channel, bytes), urgent: (sealed) => this.receivedUrgent(sealed) }, first, keepaliveMs);
  }

  sendData(channel: SessionChannel, bytes: Uint8Array, onSent?: (n: number) => void, conn = 0): void {
    for (let at = 0; at < bytes.length; at += RECORD_DATA_BYTES) {
      const piece = bytes.subarray(at, Math.min(bytes.length, at + RECORD_DATA_BYTES));
      const record = this.data.seal(create(SealedRecordSchema, { channel, data: piece, conn }), true);
      let left = record.length;
      this.port.sendData(SessionChannel.SEALED, record, (n) => {
        left -= n;
        if (left === 0) onSent?.(piece.length);
      });
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
    this.port.sendData(SessionChannel.SEALED, this.data.seal(create(SealedRecordSchema, { eof: true }), true));
  }

  /** A connection event, sealed into the data stream; with too many waiting, the session ends (see SessionPort.sendConn). */
  sendConn(event: SessionConn): void {
    if (this.eventsWaiting >= LIMITS.sessionQueuedConnEvents) {
      this.port.end(tooManyEvents());
      return;
    }
    const record = this.data.seal(create(SealedRecordSchema, { connEvent: event }), true);
    let left = record.length;
    this.eventsWaiting++;
    this.port.sendData(SessionChannel.SEALED, record, (n) => {
      left -= n;
      if (left === 0) this.eventsWaiting--;
    });
  }

  sendExit(exit: SessionExit): void {
    this.port.sendData(SessionChannel.SEALED, this.data.seal(create(SealedRecordSchema, { exit }), true));
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
        this.port.consumed(head.hop);
      }
    }
  }

  end(end: SessionEnd): void {
    this.port.end(end);
  }

  private sealUrgentSoon(): void {
    if (!this.urgent) throw new Error("internal: only the controller's side sends urgent records");
    if (this.urgentScheduled) return;
    this.urgentScheduled = true;
    setImmediate(() => {
      this.urgentScheduled = false;
      const { resize, signals } = this.urgentWaiting;
      this.urgentWaiting.resize = undefined;
      const records = [...(resize ? [create(SealedRecordSchema, { resize })] : []), ...signals.splice(0).map((signal) => create(SealedRecordSchema, { signal }))];
      // Each says how much of the data stream went before it: the host refuses one held back past later input.
      for (const r of records) {
        r.after = BigInt(this.data.count);
        this.port.sendUrgent(this.urgent!.seal(r, false));
      }
    });
  }

  private received(channel: SessionChannel, piece: Uint8Array): void {
    if (channel !== SessionChannel.SEALED) throw new InvalidArgumentError(`plain session data (channel ${channel}) on a sealed hop`);
    for (const sealed of this.assembler.push(piece)) {
      const hop = 4 + sealed.length;
      const record = this.openData.open(sealed);
      this.take(record, hop);
    }
  }

  private take(record: SealedRecord, hop: number): void {
    const h = this.handlers!;
    const fromHost = this.side === "controller";
    const kinds =
      (record.data.length > 0 ? 1 : 0) + (record.eof ? 1 : 0) + (record.exit ? 1 : 0) + (record.resize ? 1 : 0) + (record.signal !== "" ? 1 : 0) + (record.start ? 1 : 0) + (record.connEvent ? 1 : 0);
    if (kinds !== 1) throw new InvalidArgumentError("a sealed session record must hold exactly one thing");
    if (!fromHost && !this.started) throw new InvalidArgumentError("session input before the controller started the session");
    if (this.exitSeen || this.eofSeen) throw new InvalidArgumentError(`a sealed session record after the ${this.exitSeen ? "exit" : "end of input"}`);
    if (record.data.length > 0) {
      const ok = fromHost ? record.channel === SessionChannel.STDOUT || record.channel === SessionChannel.STDERR : record.channel === SessionChannel.STDIN;
      if (!ok && record.channel !== SessionChannel.CONN) throw new InvalidArgumentError(`sealed session data on channel ${record.channel}, which the ${fromHost ? "host" : "controller"} does not send`);
      if ((record.channel === SessionChannel.CONN) !== (record.conn !== 0)) throw new InvalidArgumentError("sealed session data names a connection exactly when it is on channel CONN");
      this.unconsumed.push({ plain: record.data.length, hop });
      h.data(record.channel, record.data, record.conn);
      return;
    }
    this.port.consumed(hop);
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

  private receivedUrgent(sealed: Uint8Array): void {
    if (!this.openUrgent) throw new InvalidArgumentError("urgent session records come only from the controller's side");
    const record = this.openUrgent.open(sealed);
    const h = this.handlers!;
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
