import http2 from "node:http2";

/**
 * A gRPC client that sends whatever bytes it is given: node:http2 with the
 * caller's certificate, no protobuf, no envelope checks. The fuzz test uses
 * it to send requests no real client library would build (bytes that are
 * not protobuf, truncated or lying length prefixes, a compressed flag
 * without compression, garbage frames in the middle of a stream).
 */

export interface RawTls {
  caPem: string;
  /** Absent: no client certificate (the open enroll listeners). */
  certPem?: string;
  keyPem?: string;
}

/** How one raw call ended. */
export type Outcome =
  /** The server answered with a gRPC status (in the trailers, or trailers-only headers). */
  | { kind: "status"; code: number; message: string; httpStatus: number | undefined; messages: Buffer[]; ms: number }
  /** The stream or connection ended without a gRPC status. */
  | { kind: "no-status"; httpStatus: number | undefined; detail: string; ms: number }
  /** Nothing ended the call before the client's own deadline. */
  | { kind: "timeout"; ms: number };

export type Step =
  /** Writes bytes as they are. */
  | { write: Uint8Array }
  /** Waits until this many response messages have arrived (or the call ended). */
  | { awaitMessages: number };

export interface RawCall {
  /** Extra request headers (grpc-encoding, grpc-timeout, …). */
  headers?: Record<string, string>;
  steps: Step[];
  /** Half-close the request after the steps (default true). */
  end?: boolean;
  /** The client's own deadline for the whole call. */
  timeoutMs: number;
}

/** A gRPC message envelope: flags, a big-endian length (by default the payload's) and the payload. */
export function envelope(payload: Uint8Array, flags = 0, declaredLength = payload.length): Buffer {
  const head = Buffer.alloc(5);
  head.writeUInt8(flags, 0);
  head.writeUInt32BE(declaredLength >>> 0, 1);
  return Buffer.concat([head, payload]);
}

function decodeMessage(value: unknown): string {
  const s = typeof value === "string" ? value : "";
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

export class RawGrpcClient {
  private session: http2.ClientHttp2Session | undefined;

  /**
   * @param sessionPerCall - one connection per call: the open enroll
   *   listeners close a connection abruptly (no GOAWAY) one second after its
   *   last answer, so a reused connection could be cut under the next call.
   */
  constructor(
    private readonly address: string,
    private readonly tls: RawTls,
    private readonly sessionPerCall = false,
  ) {}

  private connect(): http2.ClientHttp2Session {
    if (!this.sessionPerCall && this.session && !this.session.closed && !this.session.destroyed) return this.session;
    const s = http2.connect(`https://${this.address}`, {
      ca: this.tls.caPem,
      ...(this.tls.certPem ? { cert: this.tls.certPem, key: this.tls.keyPem } : {}),
      // Large requests (a 16 MiB message) must not hit the client's own session memory cap.
      maxSessionMemory: 64,
    });
    s.on("error", () => undefined);
    // A connection the server is leaving is not used for another call.
    s.on("goaway", () => {
      if (this.session === s) this.session = undefined;
    });
    s.on("close", () => {
      if (this.session === s) this.session = undefined;
    });
    if (!this.sessionPerCall) this.session = s;
    return s;
  }

  call(path: string, call: RawCall): Promise<Outcome> {
    const t0 = performance.now();
    const session = this.connect();
    const req = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", ...call.headers }, { endStream: false });
    let httpStatus: number | undefined;
    let status: { code: number; message: string } | undefined;
    let resetDetail = "";
    const messages: Buffer[] = [];
    let pending = Buffer.alloc(0);
    let ended = false;
    const wake = new Set<() => void>();
    const notify = () => {
      for (const w of wake) w();
    };
    const statusFrom = (h: http2.IncomingHttpHeaders) => {
      const code = h["grpc-status"];
      if (code !== undefined) status = { code: Number(code), message: decodeMessage(h["grpc-message"]) };
    };

    return new Promise<Outcome>((resolve) => {
      let settled = false;
      const finish = (o: Outcome) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ended = true;
        notify();
        if (!req.closed) req.close(http2.constants.NGHTTP2_CANCEL);
        if (this.sessionPerCall) session.close();
        resolve(o);
      };
      const ms = () => Math.round(performance.now() - t0);
      const settle = () => {
        if (status) finish({ kind: "status", ...status, httpStatus, messages, ms: ms() });
        else finish({ kind: "no-status", httpStatus, detail: resetDetail || `stream closed (RST code ${req.rstCode ?? "none"})`, ms: ms() });
      };
      const timer = setTimeout(() => finish({ kind: "timeout", ms: ms() }), call.timeoutMs);

      req.on("response", (h) => {
        httpStatus = Number(h[":status"]);
        statusFrom(h);
      });
      req.on("trailers", statusFrom);
      req.on("data", (chunk: Buffer) => {
        pending = Buffer.concat([pending, chunk]);
        while (pending.length >= 5) {
          const length = pending.readUInt32BE(1);
          if (pending.length < 5 + length) break;
          messages.push(pending.subarray(5, 5 + length));
          pending = pending.subarray(5 + length);
        }
        notify();
      });
      // The server's side is over: its status, if any, has been read.
      req.on("end", settle);
      req.on("close", settle);
      req.on("error", (err: Error) => {
        resetDetail = err.message;
      });

      const writeSteps = async () => {
        for (const step of call.steps) {
          if (ended || req.destroyed) return;
          if ("write" in step) {
            // The callback is not called if the stream dies first; the close settles the call then.
            await new Promise<void>((done) => {
              req.write(step.write, () => done());
              req.once("close", () => done());
            });
          } else {
            await new Promise<void>((done) => {
              const check = () => {
                if (ended || messages.length >= step.awaitMessages) {
                  wake.delete(check);
                  done();
                }
              };
              wake.add(check);
              check();
            });
          }
        }
        if ((call.end ?? true) && !ended && !req.destroyed && !req.writableEnded) req.end();
      };
      writeSteps().catch((err: unknown) => {
        resetDetail ||= `writing the request failed: ${String(err)}`;
      });
    });
  }

  close(): void {
    this.session?.close();
    this.session = undefined;
  }
}
