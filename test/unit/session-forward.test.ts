import { createServer, connect, type Server, type Socket } from "node:net";
import { describe, expect, it } from "vitest";
import { ForwardMux } from "../../common/session-forward.js";
import type { SessionEnd, SessionHandlers, SessionSide } from "../../common/session-port.js";
import type { SessionChannel, SessionConn } from "../../gen/rexmesh/v1/session_pb.js";

/**
 * The two ends of a forward joined in memory, `latencyMs` each way: what the
 * relays and the sealing keep (order; connection events in turn with data).
 */
function pair(latencyMs: number): [SessionSide, SessionSide, SessionEnd[]] {
  const later = (fn: () => void) => (latencyMs > 0 ? setTimeout(fn, latencyMs) : setImmediate(fn));
  const ends: SessionEnd[] = [];
  const hs: (SessionHandlers | undefined)[] = [undefined, undefined];
  const side = (me: 0 | 1): SessionSide => ({
    ended: new Promise(() => undefined),
    queuedBytes: 0,
    start: (h) => (hs[me] = h),
    whenQueueBelow: () => Promise.resolve(),
    sendData: (channel: SessionChannel, bytes: Uint8Array, onSent?: (n: number) => void, conn = 0) => {
      const copy = Buffer.from(bytes);
      later(() => hs[1 - me]?.data(channel, copy, conn));
      onSent?.(bytes.length);
    },
    sendConn: (e: SessionConn) => later(() => hs[1 - me]?.conn?.(e)),
    sendResize: () => undefined,
    sendSignal: () => undefined,
    sendEof: () => undefined,
    sendExit: () => undefined,
    consumed: () => undefined,
    end: (e) => ends.push(e),
  });
  return [side(0), side(1), ends];
}

const listen = (s: Server) => new Promise<number>((r) => s.listen(0, "127.0.0.1", () => r((s.address() as { port: number }).port)));

/** A forward between two real muxes: a local listener at the client's end, `target` dialled at the host's. */
async function forward(targetPort: number) {
  const [client, host, ends] = pair(5);
  const resets: string[] = [];
  const send = host.sendConn;
  host.sendConn = (e) => (e.reset !== "" && resets.push(e.reset), send(e));
  const cli = new ForwardMux({ side: client });
  const daemon = new ForwardMux({ side: host, dial: () => connect({ host: "127.0.0.1", port: targetPort, allowHalfOpen: true }) });
  client.start(cli.handlers());
  host.start(daemon.handlers());
  const local = createServer({ allowHalfOpen: true }, (s) => cli.attach(s));
  const port = await listen(local);
  return {
    port,
    ends,
    resets,
    close: () => {
      cli.close();
      daemon.close();
      local.close();
    },
  };
}

/** Sends `request` and half-closes; resolves with what came back and how the stream ended. */
function exchange(port: number, request: string) {
  return new Promise<{ bytes: number; how: string }>((resolve) => {
    const s: Socket = connect({ host: "127.0.0.1", port, allowHalfOpen: true });
    let bytes = 0;
    s.on("connect", () => s.end(request));
    s.on("data", (d: Buffer) => (bytes += d.length));
    s.on("end", () => resolve({ bytes, how: "fin" }));
    s.on("error", (e: NodeJS.ErrnoException) => resolve({ bytes, how: `error ${e.code ?? e.message}` }));
    s.on("close", () => resolve({ bytes, how: "closed" }));
  });
}

describe("a port forward's connections (common/session-forward.ts)", () => {
  it("deliver a response larger than the window after the client's half close whole, ending in a fin (found by an attack review: the tail was dropped)", async () => {
    for (const size of [300 * 1024, 1024 * 1024 + 5000]) {
      // The target reads the request to its end, then answers and closes (HTTP/1.0, `nc -l`).
      const target = createServer({ allowHalfOpen: true }, (s) => {
        s.resume();
        s.on("end", () => s.end(Buffer.alloc(size, 7)));
      });
      const f = await forward(await listen(target));
      try {
        for (let i = 0; i < 3; i++) expect({ got: await exchange(f.port, "GET / HTTP/1.0\r\n\r\n"), resets: f.resets, ends: f.ends }).toEqual({ got: { bytes: size, how: "fin" }, resets: [], ends: [] });
      } finally {
        f.close();
        target.close();
      }
    }
  }, 60_000);

  it("pass a target's refusal on as a reset, never as a clean end of stream", async () => {
    const gone = createServer();
    const port = await listen(gone);
    await new Promise((r) => gone.close(r));
    const f = await forward(port);
    try {
      const got = await exchange(f.port, "hello");
      expect(got.how).toBe("error ECONNRESET");
      expect(f.resets[0]).toMatch(/ECONNREFUSED/);
    } finally {
      f.close();
    }
  });
});
