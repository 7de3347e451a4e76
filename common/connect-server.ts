import http2 from "node:http2";
import type { IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import type { TLSSocket } from "node:tls";
import { createContextKey, createContextValues, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Credentials } from "../certs/files.js";
import type { PeerIdentity } from "../certs/identity.js";
import { peerIdentity, serverTlsOptions } from "../certs/tls.js";
import { PermissionDeniedError, UnauthenticatedError } from "./errors.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";
import type { Logger } from "./logger.js";

/** The verified identity of the caller, set for every request from its TLS connection. */
export const peerKey = createContextKey<PeerIdentity | undefined>(undefined, { description: "rexmesh peer" });

/** Set when the caller's identity is on the deny-list. */
export const revokedKey = createContextKey<boolean>(false, { description: "rexmesh peer revoked" });

export function callerOf(ctx: HandlerContext): PeerIdentity {
  if (ctx.values.get(revokedKey)) throw new PermissionDeniedError("this certificate's identity has been revoked");
  const peer = ctx.values.get(peerKey);
  if (!peer) throw new UnauthenticatedError("the client certificate names no rexmesh identity");
  return peer;
}

/** Identities are parsed once per TLS connection, not once per request. */
const identities = new WeakMap<object, PeerIdentity | null>();

/**
 * The connection a request came on: its HTTP/2 session, or the socket for
 * HTTP/1.1. (req.socket of an HTTP/2 request is a new proxy object per
 * stream, useless as a cache key.)
 */
function connectionOf(req: http2.Http2ServerRequest | IncomingMessage): { key: object; socket: TLSSocket } {
  const session = "stream" in req ? req.stream.session : undefined;
  if (session) return { key: session, socket: session.socket as TLSSocket };
  return { key: req.socket, socket: req.socket as TLSSocket };
}

function identityOfConnection(req: http2.Http2ServerRequest | IncomingMessage): PeerIdentity | undefined {
  const { key, socket } = connectionOf(req);
  let id = identities.get(key);
  if (id === undefined) {
    try {
      id = peerIdentity(socket);
    } catch {
      id = null;
    }
    identities.set(key, id);
  }
  return id ?? undefined;
}

export interface RpcServer {
  readonly server: http2.Http2SecureServer;
  listen(host: string, port: number): Promise<AddressInfo>;
  /** Stops accepting, lets open calls finish for graceMs, then closes every session. */
  close(graceMs: number): Promise<void>;
}

/**
 * An HTTP/2 server with mutual TLS that speaks gRPC, gRPC-Web and Connect
 * (JSON or binary) for the routes given. HTTP/1.1 is allowed too so that
 * curl and browsers can use the Connect protocol without HTTP/2.
 */
export function createRpcServer(opts: {
  creds: Credentials;
  routes: (router: ConnectRouter) => void;
  log: Logger;
  /** Checked on every request: a revoked identity is refused even on a connection opened before its revocation. */
  isRevoked?: (peer: PeerIdentity) => boolean;
}): RpcServer {
  const handler = connectNodeAdapter({
    routes: opts.routes,
    readMaxBytes: MAX_MESSAGE_BYTES,
    writeMaxBytes: MAX_MESSAGE_BYTES,
    // Responses go uncompressed even to clients that accept gzip: compressing
    // every task frame to a proxy and every large listing took a tenth of the
    // controller's CPU in a 1,000-host ping profile. Compressed requests are
    // still accepted.
    compressMinBytes: Number.MAX_SAFE_INTEGER,
    contextValues: (req) => {
      const peer = identityOfConnection(req);
      return createContextValues()
        .set(peerKey, peer)
        .set(revokedKey, peer !== undefined && (opts.isRevoked?.(peer) ?? false));
    },
  });
  const server = http2.createSecureServer({ ...serverTlsOptions(opts.creds), allowHTTP1: true }, handler);
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (s) => {
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });
  server.on("tlsClientError", (err) => opts.log.debug("TLS handshake refused", { err }));
  return {
    server,
    listen: (host, port) =>
      new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, host, () => {
          server.off("error", reject);
          resolve(server.address() as AddressInfo);
        });
      }),
    close: async (graceMs) => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const s of sessions) s.close();
      const timer = setTimeout(() => {
        for (const s of sessions) s.destroy();
      }, graceMs);
      timer.unref();
      await closed;
      clearTimeout(timer);
    },
  };
}
