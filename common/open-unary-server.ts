import type { DescMethodUnary } from "@bufbuild/protobuf";
import http2 from "node:http2";
import type { AddressInfo, Socket } from "node:net";
import type { ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Credentials } from "../certs/files.js";
import { systemClock } from "./clock.js";
import { LIMITS } from "./limits.js";
import type { Logger } from "./logger.js";
import { boundRequestArrival } from "./request-arrival.js";
import { toConnectError } from "./rpc-errors.js";
import { mapUndecodableRequests } from "./undecodable-request.js";

/** A unary method served to callers without a certificate; the handler sees only the request. */
export interface OpenUnaryHandler {
  method: DescMethodUnary;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- each handler names its own request type
  handle: (request: any) => Promise<unknown>;
}

export interface OpenUnaryServer {
  /** Binds and starts; resolves to the port bound. */
  listen(host: string, port: number): Promise<number>;
  /** Stops taking connections; after graceMs closes the ones still open. */
  close(graceMs: number): Promise<void>;
}

/** What an open listener allows one caller; defaults from common/limits.ts. */
export interface OpenListenerLimits {
  messageBytes: number;
  streamsPerConnection: number;
  connectionsPerAddress: number;
  connections: number;
  handshakeMs: number;
  idleMs: number;
  callMs: number;
}

function resolveLimits(given: Partial<OpenListenerLimits> = {}): OpenListenerLimits {
  return {
    messageBytes: given.messageBytes ?? LIMITS.openMessageBytes,
    streamsPerConnection: given.streamsPerConnection ?? LIMITS.openStreamsPerConnection,
    connectionsPerAddress: given.connectionsPerAddress ?? LIMITS.openConnectionsPerAddress,
    connections: given.connections ?? LIMITS.openConnections,
    handshakeMs: given.handshakeMs ?? LIMITS.openHandshakeMs,
    idleMs: given.idleMs ?? LIMITS.openIdleMs,
    callMs: given.callMs ?? LIMITS.openCallMs,
  };
}

/**
 * An HTTP/2 server with TLS that does not ask for a client certificate,
 * serving only the unary methods given, over gRPC (and Connect) — for
 * enrollment, whose callers have no certificate yet. Clients still verify
 * this server against the mesh CA. Every other path is UNIMPLEMENTED.
 *
 * Because anyone can connect, every resource a caller can hold is bounded
 * (common/limits.ts, docs/security.md): the TLS handshake must finish within
 * `handshakeMs`; a connection with no call in flight is closed after
 * `idleMs`; a call lasts at most `callMs`, and counts as over once its
 * answer is sent; one remote address holds at most `connectionsPerAddress`
 * connections and the server at most `connections`; a connection carries at
 * most `streamsPerConnection` calls at once; messages are at most
 * `messageBytes`. Domain errors leave through toConnectError.
 */
/** How long a connection stays after its last call was answered. */
const AFTER_CALL_MS = 1000;
/** How long a connection may wait after its handshake before its first call. */
const FIRST_CALL_MS = 5000;

export function createOpenUnaryServer(opts: { creds: Credentials; handlers: OpenUnaryHandler[]; log: Logger; limits?: Partial<OpenListenerLimits> }): OpenUnaryServer {
  const limits = resolveLimits(opts.limits);
  const handler = connectNodeAdapter({
    routes: (router) => {
      for (const h of opts.handlers) {
        router.rpc(h.method, async (req: unknown) => {
          try {
            return (await h.handle(req)) as never;
          } catch (err) {
            const wire = toConnectError(err);
            opts.log[wire.code === 13 ? "error" : "info"]("open request refused", { method: h.method.name, code: wire.code, err });
            throw wire;
          }
        });
      }
      // Like the main servers: a request that does not decode is INVALID_ARGUMENT, and one that has not
      // arrived by the caller's deadline (or callMs) is DEADLINE_EXCEEDED, answered before the stream goes.
      router.handlers.forEach((h, i) => {
        const refused = (err: ConnectError) => opts.log.info("open request refused", { method: h.method.name, code: err.code, err });
        router.handlers[i] = mapUndecodableRequests(boundRequestArrival(h, { maxMs: limits.callMs, clock: systemClock }), refused);
      });
    },
    readMaxBytes: limits.messageBytes,
    writeMaxBytes: limits.messageBytes,
  });
  const server = http2.createSecureServer(
    {
      cert: opts.creds.certPem,
      key: opts.creds.keyPem,
      minVersion: "TLSv1.3",
      requestCert: false,
      allowHTTP1: false,
      handshakeTimeout: limits.handshakeMs,
      settings: { maxConcurrentStreams: limits.streamsPerConnection },
      maxSessionMemory: 4,
    },
    handler,
  );
  server.maxConnections = limits.connections;

  // Per connection, by remote endpoint: its sockets and idle timer. (An
  // HTTP/2 session exposes only a proxy of its socket, which cannot be
  // destroyed; the TLS socket takes over the TCP socket's handle.)
  type Connection = { socket: Socket; tls?: Socket; streams: number; idle?: NodeJS.Timeout; release?: () => void };
  const perAddress = new Map<string, number>();
  const connections = new Map<string, Connection>();
  const endpoint = (s: { remoteAddress?: string; remotePort?: number }) => `${s.remoteAddress ?? "?"}|${s.remotePort ?? 0}`;
  const arm = (c: Connection, ms = limits.idleMs) => {
    clearTimeout(c.idle);
    c.idle = setTimeout(() => (c.tls ?? c.socket).destroy(), ms);
    c.idle.unref();
  };
  server.on("connection", (socket: Socket) => {
    const address = socket.remoteAddress ?? "?";
    const n = (perAddress.get(address) ?? 0) + 1;
    if (n > limits.connectionsPerAddress) {
      opts.log.debug("open listener: too many connections from one address", { address, limit: limits.connectionsPerAddress });
      socket.destroy();
      return;
    }
    perAddress.set(address, n);
    const key = endpoint(socket);
    const c: Connection = { socket, streams: 0 };
    connections.set(key, c);
    // Idle from the first byte: the handshake and the wait for a first call count too.
    arm(c);
    // Counted out once, when the connection closes: the TCP socket does not always say so once the TLS
    // socket has taken its handle over, so whichever of the two closes first does.
    let gone = false;
    c.release = () => {
      if (gone) return;
      gone = true;
      clearTimeout(c.idle);
      connections.delete(key);
      const left = (perAddress.get(address) ?? 1) - 1;
      if (left > 0) perAddress.set(address, left);
      else perAddress.delete(address);
    };
    socket.once("close", c.release);
  });
  server.on("secureConnection", (tls: Socket) => {
    const c = connections.get(endpoint(tls));
    if (!c) {
      tls.destroy();
      return;
    }
    c.tls = tls;
    tls.once("close", () => c.release?.());
    // A caller sends its call right after the handshake; a connection that does not is not kept for long.
    if (c.streams === 0) arm(c, Math.min(limits.idleMs, FIRST_CALL_MS));
  });
  server.on("tlsClientError", (err, tls: Socket) => {
    opts.log.debug("open listener: TLS handshake failed", { err });
    // A handshake that failed never reaches secureConnection, and its TCP socket no longer reports its close.
    connections.get(endpoint(tls))?.release?.();
  });

  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (session) => {
    sessions.add(session);
    const c = connections.get(endpoint(session.socket));
    session.on("stream", (stream) => {
      // No call outlives its limit, even one whose request never ends.
      const deadline = setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), limits.callMs);
      deadline.unref();
      if (!c) return;
      c.streams++;
      clearTimeout(c.idle);
      // A call is over once its answer is sent, even if the caller never ends its request.
      let ended = false;
      const end = () => {
        if (ended) return;
        ended = true;
        clearTimeout(deadline);
        // A caller gets one answer here (an enrollment) and has no use for the connection after it:
        // it goes soon, so that callers that keep theirs open cannot hold the address's share.
        if (--c.streams === 0) arm(c, Math.min(limits.idleMs, AFTER_CALL_MS));
      };
      stream.once("finish", end);
      stream.once("close", end);
    });
    session.on("error", () => undefined);
    session.once("close", () => sessions.delete(session));
  });

  return {
    listen: (host, port) =>
      new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, host, () => {
          server.off("error", reject);
          resolve((server.address() as AddressInfo).port);
        });
      }),
    close: async (graceMs) => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of sessions) s.close();
      const force = setTimeout(() => {
        for (const s of sessions) s.destroy();
      }, graceMs);
      force.unref();
      await closed;
      clearTimeout(force);
    },
  };
}
