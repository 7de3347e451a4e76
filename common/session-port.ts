import { create, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Clock, Timer } from "./clock.js";
import type { FrameLink } from "./frame-link.js";
import { Heartbeat } from "./heartbeat.js";
import { formatDuration } from "./duration.js";
import { LIMITS, truncate } from "./limits.js";
import { codeOf } from "./rpc-errors.js";
import { InvalidArgumentError } from "./errors.js";
import { ReceiveWindow, screenFrame, SendWindow, type PeerSends } from "./session-frames.js";
import {
  SessionCloseSchema,
  SessionDataSchema,
  SessionFrameSchema,
  type SessionChannel,
  type SessionConn,
  type SessionExit,
  type SessionFrame,
  type SessionOpened,
  type WindowSize,
} from "../gen/rexmesh/v1/session_pb.js";

/** How a session (or one hop of it) ended: a gRPC code (OK after an exit) and why. */
export interface SessionEnd {
  /** 0 (OK) or a gRPC code. */
  code: Code | 0;
  message: string;
  /**
   * The hop was cut rather than ended: its stream failed or ended without
   * a close, its peer fell silent, or a relay passed on such a cut (a close
   * marked resumable). The session's ends may resume it on a new leg.
   */
  cut?: boolean;
}

/**
 * A session that its far side ended with an error (the host stopped
 * answering, the process could not start, ...), as a client raises it:
 * the code and the message of the close.
 */
export class SessionEndedError extends ConnectError {}

/** How a side ends a session whose peer makes it queue too many connection events. */
export function tooManyEvents(): SessionEnd {
  return { code: Code.ResourceExhausted, message: `more than ${LIMITS.sessionQueuedConnEvents} connection events wait to be passed on: they come faster than they can go` };
}

/** Sealed urgent records a hop holds before it sends them without waiting for the next turn. */
const URGENT_BATCH = 16;

/** The end of a session whose process exited (its exit went before). */
export const ENDED_OK: SessionEnd = { code: 0, message: "" };

/** What a port hands to its user, in the order it arrived. */
export interface SessionHandlers {
  /**
   * Bytes of a channel (`conn`: the connection, on channel CONN; else 0).
   * The user calls {@link SessionPort.consumed} once it has taken them:
   * only then is credit granted again.
   */
  data(channel: SessionChannel, data: Uint8Array, conn: number): void;
  /** An event of a port forward's connection, in turn with the data. */
  conn?(event: SessionConn): void;
  resize?(size: WindowSize): void;
  signal?(name: string): void;
  eof?(): void;
  exit?(exit: SessionExit): void;
  /** A sealed record of the controller's urgent stream (sealed hops only; common/session-seal.ts opens it). */
  urgent?(sealed: Uint8Array): void;
  /** The controller started the session (a sealed hop's host side: its first urgent record). */
  start?(): void;
  /** Records of its streams the other end has opened (sealed hops; see SessionFrame.opened). */
  opened?(opened: SessionOpened): void;
  /** News of the session for the operator (the client's hop, from the controller). */
  notice?(text: string): void;
}

/**
 * What a relay and a host's bridge use of one side of a hop: a
 * {@link SessionPort} with plain data, or a SealedPort (common/session-seal.ts)
 * that seals it end to end over one.
 */
export interface SessionSide {
  readonly ended: Promise<SessionEnd>;
  readonly queuedBytes: number;
  start(handlers: SessionHandlers, first?: SessionFrame, keepaliveMs?: number): void;
  whenQueueBelow(bytes: number): Promise<void>;
  sendData(channel: SessionChannel, bytes: Uint8Array, onSent?: (n: number) => void, conn?: number): void;
  /** An event of a port forward's connection, in turn with the data. */
  sendConn(event: SessionConn): void;
  sendResize(size: WindowSize): void;
  sendSignal(name: string): void;
  sendEof(): void;
  sendExit(exit: SessionExit): void;
  /** A sealed urgent record, passed on by a proxy as it came (sealed hops only). */
  sendUrgent?(sealed: Uint8Array): void;
  /** Records this end has opened (sealed hops only); `now`: in a frame of its own if none goes anyway. */
  sendOpened?(opened: SessionOpened, now: boolean): void;
  /** News for the operator (the client's hop only). */
  sendNotice?(text: string): void;
  consumed(n: number): void;
  end(end: SessionEnd): void;
}

export interface SessionPortOptions<Out, In> {
  clock: Clock;
  /** Puts a frame into this hop's message. */
  wrap: (frame: SessionFrame) => Out;
  /** Takes the frame out of this hop's message (undefined: none in it). */
  unwrap: (message: In) => SessionFrame | undefined;
  /** What the peer is called in messages ("host", "proxy", "controller", "client"). */
  peer: string;
  /** The kinds of frames the peer may send. */
  peerSends: PeerSends;
  /**
   * A hop between the controller and the host: data only as sealed
   * records (channel SEALED), the client's resize and signal only in the
   * urgent stream. Otherwise (the client's hop) plain channels only.
   */
  sealed?: boolean;
  /** Bytes this side grants the peer. Default LIMITS.sessionWindowBytes. */
  windowBytes?: number;
  /** Keep-alive interval; the peer is gone after three silent ones. Default LIMITS.sessionKeepaliveMs. */
  keepaliveMs?: number;
  /**
   * On the serving side of a public API: an error ends the stream with its
   * status (the client's gRPC library raises it with its code) instead of a
   * close frame.
   */
  errorsAsStatus?: boolean;
  /**
   * After this side closed the session, how long it waits for the peer to
   * end the stream before closing the link itself: for links whose close
   * aborts the call (connect-node clients), which could cut off the close
   * frame. Absent: the link is closed at once.
   */
  lingerMs?: number;
  /** Defers a flush to the next turn of the event loop. Default setImmediate. */
  schedule?: (fn: () => void) => void;
  /**
   * A peer silent past the keep-alive bound is a cut (the default: a proxy
   * that froze or lost its network; the session may resume elsewhere), or
   * with false, the end: a proxy's hop to its host, where silence means the
   * host is gone, and the session ends within the keep-alive bound.
   */
  silenceIsCut?: boolean;
}

type Queued =
  | { kind: "data"; channel: SessionChannel; conn: number; bytes: Uint8Array; onSent?: (n: number) => void }
  | { kind: "conn"; event: SessionConn }
  | { kind: "eof" }
  | { kind: "exit"; exit: SessionExit }
  | { kind: "close"; end: SessionEnd };

/**
 * One side of one hop of a session, over a FrameLink of that hop's
 * messages: data leaves only within the peer's credit and in order with
 * what ends it (eof, exit, close), resize and signals leave at once, the
 * peer's frames are screened against the session limits and its data
 * against this side's grant, and keep-alives go both ways. Every hop of
 * every session, at every role, is one or two of these.
 */
export class SessionPort<Out, In> implements SessionSide {
  readonly ended: Promise<SessionEnd>;
  private resolveEnded!: (end: SessionEnd) => void;
  private done = false;
  /** An end of input and an exit come once per session: a repeat is a protocol error, not one more queued item. */
  private eofTaken = false;
  private exitTaken = false;
  private readonly send = new SendWindow();
  private readonly receive: ReceiveWindow;
  private readonly queue: Queued[] = [];
  private queued = 0;
  /** Connection events queued and not yet sent. */
  private queuedEvents = 0;
  private readonly urgent: { resize?: WindowSize; signals: string[]; sealed: Uint8Array[]; notices: string[] } = { signals: [], sealed: [], notices: [] };
  /** The count of opened records to send with the next frame, and whether it goes now even without one. */
  private opened: SessionOpened | undefined;
  private openedNow = false;
  private scheduled = false;
  private heartbeat: Heartbeat | undefined;
  private handlers: SessionHandlers | undefined;
  private readonly belowWaiters: { bytes: number; resolve: () => void }[] = [];
  private readonly schedule: (fn: () => void) => void;
  private keepaliveMs: number;
  /** The one iterator over the peer's messages (a second one would start a second call on a dialling link). */
  private iterator: AsyncIterator<In> | undefined;

  constructor(
    private readonly link: FrameLink<Out, In>,
    private readonly opts: SessionPortOptions<Out, In>,
  ) {
    this.ended = new Promise((r) => (this.resolveEnded = r));
    this.receive = new ReceiveWindow(opts.windowBytes ?? LIMITS.sessionWindowBytes);
    this.schedule = opts.schedule ?? setImmediate;
    this.keepaliveMs = opts.keepaliveMs ?? LIMITS.sessionKeepaliveMs;
  }

  /**
   * Starts the port: grants the peer its window, starts the keep-alive,
   * and reads the peer's frames (after `first`, a frame already read with
   * the hop's opening message) until the session ends. `keepaliveMs`: the
   * interval the session's order set, when it was not known at construction.
   */
  start(handlers: SessionHandlers, first?: SessionFrame, keepaliveMs?: number): void {
    if (keepaliveMs !== undefined) this.keepaliveMs = keepaliveMs;
    this.handlers = handlers;
    this.heartbeat = new Heartbeat(
      this.opts.clock,
      this.keepaliveMs,
      () => this.flushNow(true),
      () => this.finish({ code: Code.Unavailable, message: `the ${this.opts.peer} stopped answering: nothing from it for ${(3 * this.keepaliveMs) / 1000} s`, cut: this.opts.silenceIsCut ?? true }, "error"),
    );
    this.flushSoon();
    this.read(first).catch((err: unknown) => this.finish(endOf(err, this.opts.peer), "error"));
  }

  private messages(): AsyncIterator<In> {
    return (this.iterator ??= this.link.incoming[Symbol.asyncIterator]());
  }

  /**
   * The hop's opening message (the open, the session id, the started
   * answer), read before the port starts; undefined when the stream ended
   * first. A peer silent for `timeoutMs` has its stream closed with
   * DEADLINE_EXCEEDED.
   */
  async opening(timeoutMs: number): Promise<In | undefined> {
    const timer = this.opts.clock.setTimeout(() => this.link.close(new ConnectError(`no opening message from the ${this.opts.peer} within ${timeoutMs / 1000} s`, Code.DeadlineExceeded)), timeoutMs);
    try {
      const r = await this.messages().next();
      return r.done ? undefined : r.value;
    } finally {
      timer.cancel();
    }
  }

  /** Whether the session is over on this hop. */
  get isEnded(): boolean {
    return this.done;
  }

  /** Bytes queued to send and not yet sent (waiting for credit). */
  get queuedBytes(): number {
    return this.queued;
  }

  /** Bytes of the peer's data received and not yet consumed. */
  get heldBytes(): number {
    return this.receive.held;
  }

  /** Resolves once fewer than `bytes` wait to be sent (or the port ended). */
  whenQueueBelow(bytes: number): Promise<void> {
    if (this.queued < bytes || this.done) return Promise.resolve();
    return new Promise((resolve) => this.belowWaiters.push({ bytes, resolve }));
  }

  /** Queues data; `onSent` is told each part's size as it leaves (a relay consumes the previous hop's data then). */
  sendData(channel: SessionChannel, bytes: Uint8Array, onSent?: (n: number) => void, conn = 0): void {
    if (this.done || bytes.length === 0) return;
    this.queue.push({ kind: "data", channel, conn, bytes, onSent });
    this.queued += bytes.length;
    this.flushSoon();
  }

  sendResize(size: WindowSize): void {
    this.urgent.resize = size;
    this.flushSoon();
  }

  sendSignal(name: string): void {
    if (this.urgent.signals.length < 8) this.urgent.signals.push(name);
    this.flushSoon();
  }

  /**
   * A sealed urgent record: it goes at once, in order with the other
   * urgent records. (A relay cannot merge sealed records; past a few
   * waiting, they go out now rather than pile up within one turn.)
   */
  sendUrgent(sealed: Uint8Array): void {
    if (this.done) return;
    this.urgent.sealed.push(sealed);
    if (this.urgent.sealed.length >= URGENT_BATCH) this.flushNow(false);
    else this.flushSoon();
  }

  sendEof(): void {
    this.enqueue({ kind: "eof" });
  }

  /** Records opened at this end: with the next frame, or (`now`) in one of its own this turn. */
  sendOpened(opened: SessionOpened, now: boolean): void {
    if (this.done) return;
    this.opened = opened;
    if (now) {
      this.openedNow = true;
      this.flushSoon();
    }
  }

  /** News for the operator: it goes at once; past 8 waiting in one turn, more are dropped. */
  sendNotice(text: string): void {
    if (this.done) return;
    if (this.urgent.notices.length < 8) this.urgent.notices.push(truncate(text, LIMITS.sessionMessageChars));
    this.flushSoon();
  }

  /**
   * A connection event, in turn with the data. An event costs its sender
   * no credit, so a peer could make this side queue events without end: a
   * side with {@link LIMITS.sessionQueuedConnEvents} already waiting ends
   * the session instead (RESOURCE_EXHAUSTED).
   */
  sendConn(event: SessionConn): void {
    if (this.done) return;
    if (this.queuedEvents >= LIMITS.sessionQueuedConnEvents) {
      this.end(tooManyEvents());
      return;
    }
    this.queuedEvents++;
    this.enqueue({ kind: "conn", event });
  }

  sendExit(exit: SessionExit): void {
    this.enqueue({ kind: "exit", exit });
  }

  /** The user took `n` bytes of the peer's data. */
  consumed(n: number): void {
    if (this.done) return;
    this.receive.consumed(n);
    if (this.receive.grantIsDue()) this.flushSoon();
  }

  /**
   * Ends the session on this hop. With OK the close follows the data
   * queued before it; with an error it goes at once and queued data is
   * dropped.
   */
  end(end: SessionEnd): void {
    if (this.done) return;
    if (end.code === 0) {
      this.enqueue({ kind: "close", end });
      return;
    }
    this.queue.length = 0;
    this.queued = 0;
    this.finish(end, "error");
  }

  private enqueue(item: Queued): void {
    if (this.done) return;
    this.queue.push(item);
    this.flushSoon();
  }

  private flushSoon(): void {
    if (this.scheduled || this.done) return;
    this.scheduled = true;
    this.schedule(() => {
      this.scheduled = false;
      this.flushNow(false);
    });
  }

  /** Sends what credit allows, in frames of at most LIMITS.sessionDataItems items; with `keepalive`, a frame even if empty. */
  private flushNow(keepalive: boolean): void {
    if (this.done) return;
    let sentOne = false;
    for (;;) {
      const frame = create(SessionFrameSchema);
      let closing: SessionEnd | undefined;
      // A frame carries one urgent record, handled before its data: while more wait, frames carry only them, so that
      // every urgent record goes before data queued after it (a sealed one says how much data went before it).
      const urgentOnly = this.urgent.sealed.length > 1;
      while (!urgentOnly && this.queue.length > 0 && frame.data.length < LIMITS.sessionDataItems) {
        const item = this.queue[0]!;
        if (item.kind === "data") {
          const n = Math.min(item.bytes.length, this.send.available, LIMITS.sessionDataBytes);
          if (n <= 0) break;
          const offset = this.send.take(n);
          frame.data.push(create(SessionDataSchema, { channel: item.channel, offset: BigInt(offset), data: item.bytes.subarray(0, n), conn: item.conn }));
          item.bytes = item.bytes.subarray(n);
          this.queued -= n;
          if (item.bytes.length === 0) this.queue.shift();
          item.onSent?.(n);
          continue;
        }
        this.queue.shift();
        if (item.kind === "eof") frame.eof = true;
        else if (item.kind === "conn") {
          frame.conn = item.event;
          this.queuedEvents--;
        }
        else if (item.kind === "exit") frame.exit = item.exit;
        else {
          closing = item.end;
          frame.close = create(SessionCloseSchema, { code: item.end.code, message: item.end.message });
        }
        if (item.kind !== "eof") break;
      }
      if (this.urgent.resize) {
        frame.resize = this.urgent.resize;
        this.urgent.resize = undefined;
      }
      if (this.urgent.signals.length > 0) frame.signal = this.urgent.signals.shift()!;
      if (this.urgent.sealed.length > 0) frame.urgent = this.urgent.sealed.shift()!;
      if (this.urgent.notices.length > 0) frame.notice = this.urgent.notices.shift()!;
      const content =
        frame.data.length > 0 || frame.eof || frame.conn !== undefined || frame.exit !== undefined || frame.close !== undefined || frame.resize !== undefined || frame.signal !== "" || frame.urgent.length > 0 || frame.notice !== "" || this.openedNow;
      const grant = this.receive.grantDue(content || keepalive);
      if (grant) frame.grant = grant;
      if (!content && !grant && !(keepalive && !sentOne)) break;
      if (this.opened) {
        frame.opened = this.opened;
        this.opened = undefined;
        this.openedNow = false;
      }
      this.link.send(this.opts.wrap(frame));
      this.heartbeat?.sent();
      sentOne = true;
      if (closing) {
        this.finish(closing, "sent");
        return;
      }
      const more = this.queue.length > 0 && (this.queue[0]!.kind !== "data" || this.send.available > 0);
      if (!more && this.urgent.signals.length === 0 && this.urgent.sealed.length === 0 && this.urgent.notices.length === 0) break;
    }
    for (let i = this.belowWaiters.length - 1; i >= 0; i--) {
      const w = this.belowWaiters[i]!;
      if (this.queued < w.bytes) {
        this.belowWaiters.splice(i, 1);
        w.resolve();
      }
    }
  }

  private async read(first: SessionFrame | undefined): Promise<void> {
    try {
      if (first) this.take(first);
      const messages = this.messages();
      for (;;) {
        let r: IteratorResult<In>;
        try {
          r = await messages.next();
        } catch (err) {
          // The stream failed: a cut, unless the peer ended it with a status of its own (a refusal).
          const end = endOf(err, this.opts.peer);
          this.finish({ ...end, cut: isCutCode(end.code) }, "error");
          return;
        }
        if (r.done) break;
        // Once ended here, the rest is read and dropped until the peer ends the stream (see lingerMs).
        if (this.done) continue;
        this.heartbeat?.received();
        const frame = this.opts.unwrap(r.value);
        if (frame) this.take(frame);
      }
      this.finish({ code: Code.Unavailable, message: `the ${this.opts.peer} ended the session's stream without closing the session`, cut: true }, "error");
    } catch (err) {
      this.finish(endOf(err, this.opts.peer), "error");
    }
  }

  /** One frame from the peer: checked, then handed over part by part. */
  private take(frame: SessionFrame): void {
    if (this.done) return;
    screenFrame(frame, this.opts.peerSends, this.opts.sealed ?? false);
    const h = this.handlers!;
    if (frame.grant) {
      this.send.grant(frame.grant);
      if (this.queue.length > 0) this.flushSoon();
    }
    if (frame.urgent.length > 0) {
      if (!h.urgent) throw new InvalidArgumentError("an urgent session record where none is taken");
      h.urgent(frame.urgent);
    }
    if (frame.opened) h.opened?.(frame.opened);
    if (frame.notice !== "") h.notice?.(frame.notice);
    if (frame.resize) h.resize?.(frame.resize);
    if (frame.signal !== "") h.signal?.(frame.signal);
    for (const d of frame.data) {
      this.receive.accept(d);
      // A copy when the bytes are a view into a larger message: what waits for credit downstream must hold its
      // own bytes, not the whole message it came in (up to the transport's 16 MiB) for each byte.
      h.data(d.channel, d.data.byteLength === d.data.buffer.byteLength ? d.data : d.data.slice(), d.conn);
    }
    if (frame.eof) {
      if (this.eofTaken) throw new InvalidArgumentError(`the ${this.opts.peer} sent a second end of input`);
      this.eofTaken = true;
      h.eof?.();
    }
    if (frame.conn) {
      if (!h.conn) throw new InvalidArgumentError("a connection event in a session that forwards no port");
      h.conn(frame.conn);
    }
    if (frame.exit) {
      if (this.exitTaken) throw new InvalidArgumentError(`the ${this.opts.peer} sent a second exit`);
      this.exitTaken = true;
      h.exit?.(frame.exit);
    }
    if (frame.close) this.finish({ code: frame.close.code as Code | 0, message: frame.close.message, ...(frame.close.resumable ? { cut: true } : {}) }, "peer");
  }

  /**
   * The session is over on this hop. `peer`: the peer closed it; `sent`:
   * this side's close went out; `error`: this side ends it now, telling
   * the peer in a close frame (or, with errorsAsStatus, in the status).
   */
  private finish(end: SessionEnd, how: "peer" | "sent" | "error"): void {
    if (this.done) return;
    this.done = true;
    this.heartbeat?.stop();
    for (const w of this.belowWaiters.splice(0)) w.resolve();
    if (how === "error" && this.opts.errorsAsStatus) {
      this.link.close(new ConnectError(end.message, end.code || Code.Unknown));
    } else if (how === "peer" || !this.opts.lingerMs) {
      if (how === "error") this.link.send(this.closeFrame(end));
      this.link.close();
    } else {
      // A dialling connect link aborts its call when closed, which could cut off the close frame: the peer ends the stream instead.
      if (how === "error") this.link.send(this.closeFrame(end));
      const timer = this.opts.clock.setTimeout(() => this.link.close(), this.opts.lingerMs);
      this.link.closed.then(() => timer.cancel(), () => timer.cancel());
    }
    this.resolveEnded(end);
  }

  private closeFrame(end: SessionEnd): Out {
    return this.opts.wrap(create(SessionFrameSchema, { close: create(SessionCloseSchema, { code: end.code, message: truncate(end.message, LIMITS.sessionMessageChars), resumable: end.cut === true }) }));
  }
}

/**
 * A port over a hop whose messages carry the frame in their `frame` field,
 * as every session RPC's do; `schema` is the outgoing message's.
 */
export function framedPort<O extends DescMessage, In extends { frame?: SessionFrame }>(
  link: FrameLink<MessageShape<O>, In>,
  schema: O,
  opts: Omit<SessionPortOptions<MessageShape<O>, In>, "wrap" | "unwrap">,
): SessionPort<MessageShape<O>, In> {
  return new SessionPort(link, { ...opts, wrap: (frame) => create(schema, { frame } as unknown as MessageInitShape<O>), unwrap: (m) => m.frame });
}

/**
 * Statuses of a failed stream that are a cut (the peer or the connection
 * went away), not the peer's refusal: a session may resume after them.
 */
const CUT_CODES: ReadonlySet<Code | 0> = new Set([Code.Unavailable, Code.Canceled, Code.Unknown, Code.Internal, Code.Aborted]);

/** Whether a stream that failed with `code` was cut (worth another try) rather than refused. */
export function isCutCode(code: Code | 0): boolean {
  return CUT_CODES.has(code);
}

/** How a hop's stream failed, as a session end: the peer's status when it sent one. */
export function endOf(err: unknown, peer: string): SessionEnd {
  if (err instanceof ConnectError) return { code: err.code, message: err.rawMessage };
  const g = err as { code?: unknown; details?: unknown };
  if (typeof g?.code === "number" && typeof g.details === "string" && g.code >= 1 && g.code <= 16) return { code: g.code as Code, message: g.details };
  const code = codeOf(err);
  if (code !== Code.Internal) return { code, message: (err as Error).message };
  return { code: Code.Unavailable, message: `the stream to the ${peer} failed` };
}

/** How a relayed session ended: the first end, the side it came from (or the relay, by a limit), and the process's exit if it came. */
export interface RelayEnd {
  end: SessionEnd;
  from: "client" | "host" | "relay";
  exit?: SessionExit;
}

/**
 * Limits a relay holds a session to, whatever its ends do: it is idle when
 * no input came from the client's side (data, a resize, a signal; output
 * and keep-alives do not count) for `idleMs`, and over after `maxMs` in all.
 * 0 is no limit.
 */
export interface RelayLimits {
  clock: Clock;
  idleMs: number;
  maxMs: number;
  /** Who ends it, for the message ("the controller", "proxy px1"). */
  by: string;
  /**
   * Output counts as activity too: for a port forward, where a download, a
   * log stream or a notification channel is use with no input at all.
   */
  outputIsActivity?: boolean;
}

/**
 * Joins two hops of a session at a relay (the controller, a proxy): data
 * each way is passed on within the next hop's credit and consumed on the
 * previous hop only once it left, so the relay holds at most the window it
 * granted in each direction. Resize, signals, eof and exit are passed on;
 * the first end on either side ends the other. With `limits`, the relay
 * ends an idle or overlong session itself, DEADLINE_EXCEEDED on both sides.
 */
export interface RelayOptions {
  /** Frames that came with each side's opening message. */
  first?: { client?: SessionFrame; host?: SessionFrame };
  /** Keep-alive interval of both sides (the order's), when not set at construction. */
  keepaliveMs?: number;
  limits?: RelayLimits;
  /** Told each data item relayed, by direction (metrics, the recording). */
  tap?: (direction: "to_host" | "from_host", data: Uint8Array, channel: SessionChannel, conn: number) => void;
  /**
   * A cut on either side is passed on as a cut (a close marked resumable),
   * so that the session's ends pause and resume it: a proxy's relays. At
   * the controller a client that went away ends the session.
   */
  passCuts?: boolean;
}

export function relaySession(client: SessionSide, host: SessionSide, opts: RelayOptions = {}): Promise<RelayEnd> {
  const { first, keepaliveMs, limits, tap, passCuts } = opts;
  const passed = (end: SessionEnd): SessionEnd => (passCuts || !end.cut ? end : { code: end.code, message: end.message });
  let exit: SessionExit | undefined;
  let limited: SessionEnd | undefined;
  const watch = limits ? watchLimits(limits, (end) => {
    limited = end;
    client.end(end);
  }) : undefined;
  const input = () => watch?.input();
  client.start(
    {
      data: (channel, data, conn) => {
        input();
        tap?.("to_host", data, channel, conn);
        host.sendData(channel, data, (n) => client.consumed(n), conn);
      },
      conn: (event) => {
        input();
        host.sendConn(event);
      },
      resize: (size) => {
        input();
        host.sendResize(size);
      },
      signal: (name) => {
        input();
        host.sendSignal(name);
      },
      eof: () => host.sendEof(),
      urgent: (sealed) => {
        if (!host.sendUrgent) throw new InvalidArgumentError("urgent session records are relayed only between sealed hops");
        input();
        host.sendUrgent(sealed);
      },
      opened: (o) => host.sendOpened?.(o, true),
    },
    first?.client,
    keepaliveMs,
  );
  host.start(
    {
      data: (channel, data, conn) => {
        if (limits?.outputIsActivity) input();
        tap?.("from_host", data, channel, conn);
        client.sendData(channel, data, (n) => host.consumed(n), conn);
      },
      conn: (event) => client.sendConn(event),
      exit: (e) => {
        exit = e;
        client.sendExit(e);
      },
      opened: (o) => client.sendOpened?.(o, true),
      notice: (text) => client.sendNotice?.(text),
    },
    first?.host,
    keepaliveMs,
  );
  // Resolved once the other side has ended too: its close (after the output and the exit queued before it) has
  // gone out on its stream, so that whoever serves the stream does not end it with that still queued.
  const ended = Promise.race([
    client.ended.then(async (end) => {
      host.end(end.code === 0 ? { code: Code.Canceled, message: "the client closed the session" } : passed(end));
      await host.ended;
      return { end, from: limited ? ("relay" as const) : ("client" as const), exit };
    }),
    host.ended.then(async (end) => {
      client.end(passed(end));
      await client.ended;
      return { end, from: "host" as const, exit };
    }),
  ]);
  return ended.finally(() => watch?.stop());
}

/** The timers of {@link RelayLimits}: `input()` on each input from the client's side. */
function watchLimits(l: RelayLimits, end: (e: SessionEnd) => void): { input(): void; stop(): void } {
  let last = l.clock.now();
  const max = l.maxMs > 0 ? l.clock.setTimeout(() => end({ code: Code.DeadlineExceeded, message: `the session reached its maximum duration of ${formatDuration(l.maxMs)}: ended by ${l.by}` }), l.maxMs) : undefined;
  let idle: Timer | undefined;
  const check = () => {
    const quiet = l.clock.now() - last;
    if (quiet >= l.idleMs) end({ code: Code.DeadlineExceeded, message: `the session was idle (${l.outputIsActivity ? "no traffic" : "no input"}) for ${formatDuration(l.idleMs)}: ended by ${l.by}` });
    else idle = l.clock.setTimeout(check, l.idleMs - quiet);
  };
  if (l.idleMs > 0) idle = l.clock.setTimeout(check, l.idleMs);
  return {
    input: () => (last = l.clock.now()),
    stop: () => {
      max?.cancel();
      idle?.cancel();
    },
  };
}
