/**
 * The connections of a port forward over one session (docs/sessions.md,
 * "Port forwarding"), the same at both ends: the client's side (the CLI)
 * attaches each local connection it accepts and opens it on the host; the
 * host's side (the daemon) dials the forward's target for each open.
 *
 * Every connection has a credit window of its own, end to end, beside the
 * session's per-hop credit: a side sends on a connection only what the
 * other granted for it (the window at the open, then each `grant`, given
 * once the bytes were written to the connection's socket). A side takes a
 * connection's bytes off the session at once (the session's credit keeps
 * flowing) and holds them in that socket's buffer, at most one window: so
 * a connection whose reader stalls stops only itself, and holds at most a
 * window at either end, while the relays hold at most their hop windows.
 */
import type { Socket } from "node:net";
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { InvalidArgumentError } from "./errors.js";
import { LIMITS, truncate } from "./limits.js";
import type { Logger } from "./logger.js";
import type { SessionHandlers, SessionSide } from "./session-port.js";
import { SessionChannel, SessionConnSchema, type SessionConn } from "../gen/rexmesh/v1/session_pb.js";

export interface ForwardMuxOptions {
  side: SessionSide;
  /** The host's side: a socket connecting to the forward's target, for each connection opened. */
  dial?: () => Socket;
  log?: Logger;
  /** Credit each connection starts with, each way. Default LIMITS.forwardWindowBytes (both ends must agree). */
  windowBytes?: number;
  /** Connections open at once at most. Default LIMITS.forwardConnections. */
  maxConnections?: number;
}

interface Conn {
  id: number;
  socket: Socket;
  /** Bytes this side may still send on the connection. */
  credit: number;
  /** Read from the socket, waiting for credit. */
  waiting: Buffer[];
  /** Bytes the peer may still send before this side grants more (below 0: it sent past its credit). */
  allowance: number;
  /** Written to the socket since the last grant. */
  written: number;
  /** The socket's reader ended: a fin goes once what waits has gone. */
  readEnded: boolean;
  finSent: boolean;
  /** The socket is closed (its last bytes may still wait for credit, and the fin after them). */
  socketClosed: boolean;
  /** Over: reset either way, or closed. */
  over: boolean;
}

export class ForwardMux {
  private readonly conns = new Map<number, Conn>();
  private nextId = 1;
  private readonly window: number;
  private readonly max: number;
  private closed = false;
  /** Connections opened in all. */
  opened = 0;

  constructor(private readonly opts: ForwardMuxOptions) {
    this.window = opts.windowBytes ?? LIMITS.forwardWindowBytes;
    this.max = opts.maxConnections ?? LIMITS.forwardConnections;
  }

  /** Connections open now. */
  get open(): number {
    return this.conns.size;
  }

  /** What the session's side hands this mux: the connections' data and events. */
  handlers(): Pick<SessionHandlers, "data" | "conn"> {
    return {
      data: (channel, data, conn) => this.received(channel, data, conn),
      conn: (event) => this.event(event),
    };
  }

  /** The client's side: a local connection accepted; it is opened on the host. */
  attach(socket: Socket): void {
    if (this.closed || this.conns.size >= this.max) {
      this.opts.log?.warn("a forwarded connection was refused", { reason: this.closed ? "the session is over" : `${this.max} connections are open` });
      socket.destroy();
      return;
    }
    const id = this.nextId++;
    this.opts.side.sendConn(create(SessionConnSchema, { conn: id, open: true }));
    this.track(id, socket);
  }

  /** Ends every connection (the session is over). */
  close(): void {
    this.closed = true;
    for (const c of this.conns.values()) {
      c.over = true;
      c.socket.destroy();
    }
    this.conns.clear();
  }

  private track(id: number, socket: Socket): Conn {
    const c: Conn = { id, socket, credit: this.window, waiting: [], allowance: this.window, written: 0, readEnded: false, finSent: false, socketClosed: false, over: false };
    this.conns.set(id, c);
    this.opened++;
    socket.on("data", (chunk: Buffer) => this.read(c, chunk));
    socket.on("end", () => {
      c.readEnded = true;
      this.sendWaiting(c);
    });
    socket.on("error", (err: Error) => this.reset(c, err.message));
    socket.on("close", () => {
      c.socketClosed = true;
      if (c.over) {
        this.conns.delete(id);
        return;
      }
      // After a clean end what was read still goes, and then the fin (sendWaiting ends the connection).
      if (c.readEnded) this.sendWaiting(c);
      // Closed without its end being read: the peer learns it is over.
      else this.reset(c, "the connection closed");
    });
    return c;
  }

  /** Bytes read from a connection's socket: sent within its credit, the rest waits (and the socket is paused). */
  private read(c: Conn, chunk: Buffer): void {
    if (c.over) return;
    c.waiting.push(chunk);
    this.sendWaiting(c);
  }

  private sendWaiting(c: Conn): void {
    while (c.waiting.length > 0 && c.credit > 0) {
      const head = c.waiting[0]!;
      const n = Math.min(head.length, c.credit);
      this.opts.side.sendData(SessionChannel.CONN, head.subarray(0, n), undefined, c.id);
      c.credit -= n;
      if (n === head.length) c.waiting.shift();
      else c.waiting[0] = head.subarray(n);
    }
    if (c.waiting.length > 0) {
      if (!c.socketClosed) c.socket.pause();
      return;
    }
    if (!c.readEnded) c.socket.resume();
    else if (!c.finSent) {
      c.finSent = true;
      this.opts.side.sendConn(create(SessionConnSchema, { conn: c.id, fin: true }));
    }
    if (c.finSent && c.socketClosed) {
      c.over = true;
      this.conns.delete(c.id);
    }
  }

  private received(channel: SessionChannel, data: Uint8Array, id: number): void {
    if (channel !== SessionChannel.CONN) throw new InvalidArgumentError(`a port forward carries connections only, not channel ${channel}`);
    // Taken off the session at once: what waits for a slow reader waits in its own socket, within its own credit.
    this.opts.side.consumed(data.length);
    const c = this.conns.get(id);
    if (!c || c.over || c.socketClosed) return; // reset or closed on this side, its data still on the way
    c.allowance -= data.length;
    if (c.allowance < 0) {
      this.opts.side.end({ code: Code.ResourceExhausted, message: `connection ${id} of the port forward sent past its credit` });
      return;
    }
    c.socket.write(data, () => {
      if (c.over) return;
      c.written += data.length;
      if (c.written >= this.window / 4) {
        const grant = c.written;
        c.written = 0;
        c.allowance += grant;
        this.opts.side.sendConn(create(SessionConnSchema, { conn: c.id, grant }));
      }
    });
  }

  private event(e: SessionConn): void {
    if (e.open) {
      this.dial(e.conn);
      return;
    }
    const c = this.conns.get(e.conn);
    if (!c || c.over) return;
    if (e.grant > 0) {
      c.credit += e.grant;
      this.sendWaiting(c);
    } else if (e.fin) {
      c.socket.end();
    } else if (e.reset !== "") {
      c.over = true;
      this.conns.delete(c.id);
      // A reset here too (RST), not a clean end: the application must not take a cut stream for a whole one.
      if (c.socketClosed) c.socket.destroy();
      else c.socket.resetAndDestroy();
      this.opts.log?.debug("forwarded connection reset by the other end", { conn: c.id, reason: e.reset });
    }
  }

  /** The host's side: a connection the client opened, dialled to the target. */
  private dial(id: number): void {
    const refuse = (reason: string) => this.opts.side.sendConn(create(SessionConnSchema, { conn: id, reset: reason }));
    if (!this.opts.dial) throw new InvalidArgumentError("connections are opened only from the client's side");
    if (id < this.nextId || this.conns.has(id)) throw new InvalidArgumentError(`connection ${id} was opened before`);
    this.nextId = id + 1;
    if (this.closed) return;
    if (this.conns.size >= this.max) {
      refuse(`the host has ${this.max} connections of this forward open`);
      return;
    }
    this.track(id, this.opts.dial());
  }

  /** A connection failed here: the other end is told, and it is over. */
  private reset(c: Conn, reason: string): void {
    if (c.over) return;
    c.over = true;
    this.conns.delete(c.id);
    c.socket.destroy();
    if (!this.closed) this.opts.side.sendConn(create(SessionConnSchema, { conn: c.id, reset: truncate(reason, LIMITS.sessionMessageChars) || "reset" }));
  }
}
