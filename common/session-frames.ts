/**
 * The rules of a session hop (docs/sessions.md), as pure logic: byte
 * offsets and credits each way ({@link SendWindow}, {@link ReceiveWindow}),
 * and what a frame and a session's spec may hold ({@link screenFrame},
 * {@link checkSessionSpec}). Every hop of every session uses them, on both
 * sides, so that a peer is held to the same limits wherever it sits.
 */
import { create } from "@bufbuild/protobuf";
import { InvalidArgumentError, ResourceExhaustedError } from "./errors.js";
import { checkBytes, checkCount, LIMITS, preview, truncate } from "./limits.js";
import { SessionChannel, SessionGrantSchema, type SessionConn, type SessionData, type SessionFrame, type SessionGrant, type SessionSpec } from "../gen/rexmesh/v1/session_pb.js";

/** What a peer of a hop may send: the client's side sends input (stdin, resize, signals, eof), the host's side output (stdout, stderr, exit). */
export type PeerSends = "input" | "output";

/** Signals a client may send to a session's process group, by their names without "SIG". */
export const SESSION_SIGNALS = ["INT", "TERM", "HUP", "QUIT", "KILL", "USR1", "USR2", "WINCH", "TSTP", "CONT"] as const;
export type SessionSignal = (typeof SESSION_SIGNALS)[number];

export function isSessionSignal(name: string): name is SessionSignal {
  return (SESSION_SIGNALS as readonly string[]).includes(name);
}

/**
 * The sending half of one direction of a hop: the offset of the next byte,
 * and how far the peer's grants allow. A grant that acknowledges bytes
 * never sent, or takes back an acknowledgement, is a protocol error.
 */
export class SendWindow {
  private sent = 0;
  private acked = 0;
  private limit = 0;

  /** Bytes that may be sent now. */
  get available(): number {
    return Math.max(0, this.limit - this.sent);
  }

  /** Bytes sent and not yet acknowledged. */
  get unacked(): number {
    return this.sent - this.acked;
  }

  grant(g: SessionGrant): void {
    const ack = Number(g.ack);
    if (!Number.isSafeInteger(ack) || ack < this.acked || ack > this.sent) {
      throw new InvalidArgumentError(`a session grant acknowledged byte ${g.ack}, but ${this.sent} were sent and ${this.acked} already acknowledged`);
    }
    if (g.window > LIMITS.sessionWindowMaxBytes) throw new InvalidArgumentError(`a session grant of ${g.window} bytes is larger than ${LIMITS.sessionWindowMaxBytes}`);
    this.acked = ack;
    this.limit = Math.max(this.limit, ack + g.window);
  }

  /** Takes `n` bytes of the credit; returns their offset. */
  take(n: number): number {
    if (n > this.available) throw new Error(`internal: ${n} bytes taken with ${this.available} available`);
    const offset = this.sent;
    this.sent += n;
    return offset;
  }
}

/**
 * The receiving half: data must come at the next offset and within what
 * was granted; what the consumer has taken is granted again, in steps of a
 * quarter of the window (or with any frame that goes anyway), so that a
 * byte-at-a-time stream does not cost a grant per byte.
 */
export class ReceiveWindow {
  private received = 0;
  private taken = 0;
  private limit = 0;
  private lastAck = -1;

  constructor(readonly window: number = LIMITS.sessionWindowBytes) {}

  /** Checks a data item against the offsets and the grant; throws when the peer broke them. */
  accept(d: SessionData): void {
    const offset = Number(d.offset);
    if (offset !== this.received) throw new InvalidArgumentError(`session data at byte ${d.offset}, where byte ${this.received} was next`);
    if (this.received + d.data.length > this.limit) {
      throw new ResourceExhaustedError(`the peer sent session data past its credit: up to byte ${this.received + d.data.length}, ${this.limit} granted`);
    }
    this.received += d.data.length;
  }

  /** The consumer has taken `n` more bytes (passed them on, written them out). */
  consumed(n: number): void {
    if (this.taken + n > this.received) throw new Error(`internal: ${this.taken + n} bytes consumed of ${this.received} received`);
    this.taken += n;
  }

  /** Bytes received and not yet taken: what this side holds. */
  get held(): number {
    return this.received - this.taken;
  }

  /** Whether a grant is due even with no frame going out: the first one, or a quarter of the window taken since the last. */
  grantIsDue(): boolean {
    return this.lastAck < 0 || this.taken - this.lastAck >= this.window / 4;
  }

  /**
   * The grant to send now, if one is due: the first one, one once a
   * quarter of the window was taken since the last, or, with `anyway` (a
   * frame goes out in any case), one whenever anything was taken.
   */
  grantDue(anyway = false): SessionGrant | undefined {
    if (!this.grantIsDue() && !(anyway && this.taken > this.lastAck)) return undefined;
    this.lastAck = this.taken;
    this.limit = this.taken + this.window;
    return create(SessionGrantSchema, { ack: BigInt(this.taken), window: this.window });
  }
}

const INPUT_CHANNELS: ReadonlySet<SessionChannel> = new Set([SessionChannel.STDIN, SessionChannel.CONN]);
const OUTPUT_CHANNELS: ReadonlySet<SessionChannel> = new Set([SessionChannel.STDOUT, SessionChannel.STDERR, SessionChannel.CONN]);
const SEALED_CHANNELS: ReadonlySet<SessionChannel> = new Set([SessionChannel.SEALED]);
/** Sealed bytes of one urgent record at most (a resize or a signal seals to a few dozen). */
export const URGENT_SEALED_BYTES = 256;

/**
 * Checks a frame from a peer before anything of it is used: its data items
 * (count, size, a channel of the peer's direction), and only the kinds of
 * message the peer's side sends. Throws InvalidArgumentError naming the
 * problem; a close message that is too long is cut instead.
 */
export function screenFrame(frame: SessionFrame, peerSends: PeerSends, sealed = false): void {
  checkCount("session frame data items", frame.data.length, LIMITS.sessionDataItems);
  const channels = sealed ? SEALED_CHANNELS : peerSends === "input" ? INPUT_CHANNELS : OUTPUT_CHANNELS;
  for (const d of frame.data) {
    if (!channels.has(d.channel)) {
      throw new InvalidArgumentError(sealed ? `plain session data (channel ${d.channel}) on a hop that carries only sealed records` : `session data on channel ${d.channel}, which the ${peerSends === "input" ? "client" : "host"} side does not send`);
    }
    if (d.data.length === 0) throw new InvalidArgumentError("session data item without bytes");
    if ((d.channel === SessionChannel.CONN) !== (d.conn !== 0)) throw new InvalidArgumentError("session data names a connection exactly when it is on channel CONN");
    checkBytes("a session data item", d.data, LIMITS.sessionDataBytes);
  }
  if (sealed) {
    // Between the controller and the host everything but credit and the close is inside the sealed records.
    if (frame.resize || frame.signal !== "" || frame.eof || frame.exit || frame.conn) throw new InvalidArgumentError("a plain resize, signal, end of input, exit or connection event on a hop that carries only sealed records");
    if (frame.urgent.length > 0 && peerSends !== "input") throw new InvalidArgumentError("urgent session records come only from the controller's side");
    if (frame.urgent.length > URGENT_SEALED_BYTES) throw new InvalidArgumentError(`an urgent session record of ${frame.urgent.length} bytes (at most ${URGENT_SEALED_BYTES})`);
    if (frame.opened && frame.opened.urgent > 0n && peerSends !== "output") throw new InvalidArgumentError("only the host's side opens urgent session records");
    if (frame.notice !== "") throw new InvalidArgumentError("a notice on a hop that carries only sealed records");
  } else {
    if (frame.urgent.length > 0) throw new InvalidArgumentError("a sealed urgent record on a session's plain hop");
    if (frame.opened) throw new InvalidArgumentError("a count of opened records on a session's plain hop");
    if (frame.notice !== "" && peerSends !== "output") throw new InvalidArgumentError("notices come only from the controller's side of a session");
    frame.notice = truncate(frame.notice, LIMITS.sessionMessageChars);
  }
  const wrongSide = (what: string) => new InvalidArgumentError(`${what} comes only from the ${peerSends === "input" ? "host" : "client"} side of a session`);
  if (peerSends === "input") {
    if (frame.exit) throw wrongSide("an exit");
    if (frame.resize) checkWindowSize(frame.resize.cols, frame.resize.rows);
    if (frame.signal !== "" && !isSessionSignal(frame.signal)) throw new InvalidArgumentError(`signal ${preview(frame.signal)} is not one a session passes on (${SESSION_SIGNALS.join(", ")})`);
  } else {
    if (frame.resize) throw wrongSide("a resize");
    if (frame.signal !== "") throw wrongSide("a signal");
    if (frame.eof) throw wrongSide("an end of input");
    if (frame.exit && frame.exit.signal.length > 32) throw new InvalidArgumentError("an exit's signal name is longer than 32 characters");
  }
  if (frame.conn) checkConnEvent(frame.conn, peerSends);
  if (frame.close) {
    if (frame.close.code > 16) throw new InvalidArgumentError(`a session close with code ${frame.close.code}, which is no gRPC code`);
    frame.close.message = truncate(frame.close.message, LIMITS.sessionMessageChars);
  }
}

/**
 * An event of a port forward's connection, from a peer on `peerSends`'s
 * side: a connection id, exactly one thing, an open only from the client's
 * side; a long reason is cut.
 */
export function checkConnEvent(e: SessionConn, peerSends: PeerSends): void {
  if (e.conn === 0) throw new InvalidArgumentError("a connection event without a connection");
  const kinds = (e.open ? 1 : 0) + (e.fin ? 1 : 0) + (e.reset !== "" ? 1 : 0) + (e.grant > 0 ? 1 : 0);
  if (kinds !== 1) throw new InvalidArgumentError("a connection event must say exactly one thing (open, fin, reset or grant)");
  if (e.open && peerSends !== "input") throw new InvalidArgumentError("connections are opened only from the client's side");
  if (e.grant > LIMITS.sessionWindowMaxBytes) throw new InvalidArgumentError(`a connection grant of ${e.grant} bytes is larger than ${LIMITS.sessionWindowMaxBytes}`);
  e.reset = truncate(e.reset, LIMITS.sessionMessageChars);
}

/** A terminal size within bounds: 1 to LIMITS.sessionWindowCells each way. */
export function checkWindowSize(cols: number, rows: number): void {
  const max = LIMITS.sessionWindowCells;
  if (cols < 1 || rows < 1 || cols > max || rows > max) throw new InvalidArgumentError(`a terminal of ${cols}x${rows} is outside 1x1 to ${max}x${max}`);
}

const TERM = /^[A-Za-z0-9._+-]*$/;

/** Checks what a session asks to run: the same at the controller (from the client) and at the host (from the order). */
export function checkSessionSpec(spec: SessionSpec): void {
  checkCount("session argv", spec.argv.length, LIMITS.sessionArgs);
  let total = 0;
  for (const a of spec.argv) {
    if (a.includes("\0")) throw new InvalidArgumentError("a session argument contains a NUL byte");
    checkBytes("a session argument", a, LIMITS.argBytes);
    total += a.length;
  }
  if (total > LIMITS.argBytes) throw new InvalidArgumentError(`the session's arguments are larger than ${LIMITS.argBytes} bytes together`);
  if (spec.argv.length > 0 && spec.argv[0] === "") throw new InvalidArgumentError("the session's program is empty");
  if (spec.term.length > LIMITS.sessionTermChars || !TERM.test(spec.term)) throw new InvalidArgumentError(`TERM ${preview(spec.term)} is not a terminal name (letters, digits, . _ + -; at most ${LIMITS.sessionTermChars})`);
  if (spec.tty && spec.window) checkWindowSize(spec.window.cols, spec.window.rows);
  if (spec.forward) {
    if (spec.argv.length > 0 || spec.tty) throw new InvalidArgumentError("a port forward runs no program and has no terminal");
    const { host, port } = spec.forward;
    if (!FORWARD_HOST.test(host)) throw new InvalidArgumentError(`forward target ${preview(host)} is not an address or a host name`);
    if (port < 1 || port > 65535) throw new InvalidArgumentError(`forward port ${port} is not 1-65535`);
  }
}

/** An IPv4 or IPv6 address or a DNS name, as a forward's target names it. */
const FORWARD_HOST = /^(?=.{1,253}$)(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$/;

/** A session's keep-alive interval as its order or its start names it: at least a second; 0 (not said) is undefined, the default. */
export function keepaliveOf(ms: number): number | undefined {
  return ms > 0 ? Math.max(1000, ms) : undefined;
}
