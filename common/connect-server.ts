import http2 from "node:http2";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import type { TLSSocket } from "node:tls";
import type { DescMethod } from "@bufbuild/protobuf";
import { Code, createContextKey, createContextValues, type ConnectError, type ConnectRouter, type ContextValues, type HandlerContext, type Interceptor } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { UniversalServerRequest } from "@connectrpc/connect/protocol";
import type { Credentials } from "../certs/files.js";
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import { peerIdentity, serverTlsOptions } from "../certs/tls.js";
import { InvalidArgumentError, PermissionDeniedError, UnauthenticatedError } from "./errors.js";
import { systemClock, type Clock } from "./clock.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";
import { LIMITS } from "./limits.js";
import type { Logger } from "./logger.js";
import { admitIdentity, pathOf, type Call, type DeclarationTable, type Grant } from "./rpc-access.js";
import { boundRequestArrival, failingOnAbort } from "./request-arrival.js";
import { isDecodeFailure, toConnectError } from "./rpc-errors.js";
import { mapUndecodableRequests } from "./undecodable-request.js";
import { countingRequests, gatingRequests } from "./counted-request.js";

/** The verified identity of the caller, set for every request from its TLS connection. */
export const peerKey = createContextKey<PeerIdentity | undefined>(undefined, { description: "rexmesh peer" });

/** Set when the caller's identity is on the deny-list. */
export const revokedKey = createContextKey<boolean>(false, { description: "rexmesh peer revoked" });

/** What the boundary allowed for this call; set by the interceptor before any handler runs. */
export const grantKey = createContextKey<Grant | undefined>(undefined, { description: "rexmesh grant" });

/**
 * The grant of this call. A handler acts only on what the boundary allowed:
 * without a grant (a handler reached some other way) nothing is done.
 */
export function grantOf(ctx: HandlerContext): Grant {
  const grant = ctx.values.get(grantKey);
  if (!grant) throw new PermissionDeniedError("this call was not authorized");
  return grant;
}

/** Who the boundary allowed this call for: the peer of its grant. */
export function grantedPeer(ctx: HandlerContext): PeerIdentity {
  const peer = grantOf(ctx).peer;
  if (!peer) throw new UnauthenticatedError("this call has no verified caller");
  return peer;
}

/**
 * Whether the call's responses go out in protobuf's binary format (gRPC,
 * gRPC-Web, Connect with proto), where a message's unknown fields are
 * written as they are: a handler may then hand parts of a response over
 * already encoded (common/output-wire.ts). JSON leaves unknown fields out,
 * so there (and where the content type is not known) it may not.
 */
export function respondsInBinary(ctx: HandlerContext): boolean {
  const type = ctx.requestHeader.get("content-type");
  return type !== null && type.startsWith("application/") && !/json/i.test(type);
}

/** The verified peer of a call, for code that runs behind a session helper (links, enrollment). */
export function callerOf(ctx: HandlerContext): PeerIdentity {
  if (ctx.values.get(revokedKey)) throw new PermissionDeniedError("this certificate's identity has been revoked");
  const peer = ctx.values.get(peerKey);
  if (!peer) throw new UnauthenticatedError("the client certificate names no rexmesh identity");
  return peer;
}

/**
 * What a call knows of its caller before the boundary runs: the identity
 * its connection's certificate names (undefined: none), and whether that
 * identity is on the deny-list — asked per request, so that a revocation
 * reaches connections opened before it. The server builds it for every
 * request; the service tests' in-memory transport for its one caller.
 */
export function callerContext(peer: PeerIdentity | undefined, isRevoked?: (peer: PeerIdentity) => boolean, notAfter?: number): ContextValues {
  return createContextValues()
    .set(peerKey, peer)
    .set(peerNotAfterKey, notAfter)
    .set(revokedKey, peer !== undefined && (isRevoked?.(peer) ?? false));
}

/** When the caller's certificate expires (ms), for a call that came with one. */
export const peerNotAfterKey = createContextKey<number | undefined>(undefined, { description: "rexmesh peer certificate expiry" });

/** Identities (and when their certificate expires) are parsed once per TLS connection, not once per request. */
const identities = new WeakMap<object, { peer: PeerIdentity; notAfter: number } | null>();

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

function identityOfConnection(req: http2.Http2ServerRequest | IncomingMessage): { peer: PeerIdentity; notAfter: number } | undefined {
  const { key, socket } = connectionOf(req);
  let id = identities.get(key);
  if (id === undefined) {
    try {
      id = { peer: peerIdentity(socket), notAfter: Date.parse(socket.getPeerCertificate().valid_to) };
    } catch {
      id = null;
    }
    identities.set(key, id);
  }
  return id ?? undefined;
}

export interface RpcServer {
  readonly server: http2.Http2SecureServer;
  /** Every method served, each with a declaration (checked when the server was made). */
  readonly served: readonly DescMethod[];
  listen(host: string, port: number): Promise<AddressInfo>;
  /** Stops accepting, lets open calls finish for graceMs, then closes every session. */
  close(graceMs: number): Promise<void>;
}

export interface RpcHandlerOptions {
  routes: (router: ConnectRouter) => void;
  log: Logger;
  declarations: DeclarationTable;
  /** Decides a call that is not open (policy, audit); refuses by throwing. */
  decide: (call: Call) => Promise<Grant>;
  /** Times the arrival of requests (LIMITS.requestArrivalMs); the system clock by default. */
  clock?: Clock;
}

/**
 * The Connect request handler behind one boundary ({@link boundaryInterceptor}),
 * for any listener: `callerOf` says who a request comes from (its
 * connection's certificate on the main port, a session cookie on the
 * console's), and everything after that — declarations, policy, audit,
 * limits, error mapping — is the same code for every listener. Throws if a
 * route serves a method the table does not declare.
 */
export function createRpcHandler(opts: RpcHandlerOptions & { callerOf: (req: http2.Http2ServerRequest | IncomingMessage) => ContextValues }): { handler: NodeHandler; served: DescMethod[] } {
  const clock = opts.clock ?? systemClock;
  let served: DescMethod[] = [];
  const refusedUndecodable = (method: DescMethod) => (err: ConnectError, req: UniversalServerRequest) => {
    const peer = req.contextValues?.get(peerKey);
    opts.log.warn("malformed request refused", { method: pathOf(method), peer: peer ? formatIdentity(peer) : "unidentified", code: err.code, err });
  };
  /**
   * A unary request's body is decoded before the boundary sees it (connect-es passes the boundary a message). A caller
   * whom no request could admit — no identity, revoked, or a role the method does not take — is refused here first,
   * by the same decision (so audited as the boundary audits it), before its body is read: a host certificate must not
   * make the controller inflate and parse 16 MiB for a method it may never call. Streams are decided before their
   * first message anyway.
   */
  const unaryGate = (method: DescMethod) => {
    const declared = opts.declarations.get(method);
    if (!declared || "open" in declared.declaration || method.methodKind !== "unary") return undefined;
    return async (req: UniversalServerRequest): Promise<void> => {
      const call = { declared, peer: req.contextValues?.get(peerKey), revoked: req.contextValues?.get(revokedKey) ?? false };
      try {
        admitIdentity(call);
        return;
      } catch {
        // Refused whatever the request: decided (and audited) as the boundary would, without it.
      }
      try {
        await opts.decide({ ...call, request: undefined });
      } catch (err) {
        const wire = toConnectError(err);
        opts.log.info("request refused", { method: pathOf(method), peer: call.peer ? formatIdentity(call.peer) : "unidentified", code: wire.code, err, before: "its body was read" });
        throw wire;
      }
      throw new PermissionDeniedError("internal: a caller refused by identity was allowed by the decision");
    };
  };
  const handler = connectNodeAdapter({
    // A JSON field the message does not have is refused (INVALID_ARGUMENT, naming it), not dropped: connect-es ignores
    // them by default, and a misspelt "hostIDs" would then be a request without its target.
    jsonOptions: { ignoreUnknownFields: false },
    routes: (router) => {
      opts.routes(router);
      served = router.handlers.map((h) => h.method);
      opts.declarations.requireDeclared(served);
      router.handlers.forEach((h, i) => {
        const gate = unaryGate(h.method);
        const counted = countingRequests(h);
        router.handlers[i] = mapUndecodableRequests(boundRequestArrival(gate ? gatingRequests(counted, gate) : counted, { maxMs: LIMITS.requestArrivalMs, clock }), refusedUndecodable(h.method));
      });
    },
    interceptors: [boundaryInterceptor(opts)],
    readMaxBytes: MAX_MESSAGE_BYTES,
    writeMaxBytes: MAX_MESSAGE_BYTES,
    // Responses go uncompressed even to clients that accept gzip: compressing
    // every task frame to a proxy and every large listing took a tenth of the
    // controller's CPU in a 1,000-host ping profile. Compressed requests are
    // still accepted, inflated once to be counted first (common/counted-request.ts).
    compressMinBytes: Number.MAX_SAFE_INTEGER,
    contextValues: opts.callerOf,
  });
  return { handler, served };
}

/**
 * An HTTP/2 server with mutual TLS that speaks gRPC, gRPC-Web and Connect
 * (JSON or binary) for the routes given. HTTP/1.1 is allowed too so that
 * curl and browsers can use the Connect protocol without HTTP/2.
 *
 * Every call passes one boundary ({@link boundaryInterceptor}): its
 * method's declaration, the caller's certificate and `decide` allow it or
 * not, and every error leaves through common/rpc-errors.ts. Creating the
 * server throws if a route serves a method the table does not declare.
 */
export function createRpcServer(opts: RpcHandlerOptions & {
  creds: Credentials;
  /** Checked on every request: a revoked identity is refused even on a connection opened before its revocation. */
  isRevoked?: (peer: PeerIdentity) => boolean;
}): RpcServer {
  const clock = opts.clock ?? systemClock;
  const { handler, served } = createRpcHandler({ ...opts, callerOf: (req) => {
      const id = identityOfConnection(req);
      return callerContext(id?.peer, opts.isRevoked, id?.notAfter);
    },
  });
  const server = http2.createSecureServer(
    { ...serverTlsOptions(opts.creds), allowHTTP1: true, settings: { maxConcurrentStreams: LIMITS.streamsPerConnection } },
    closingUnfinishedRequests(handler, served, clock),
  );
  server.on("tlsClientError", (err) => opts.log.debug("TLS handshake refused", { err }));
  return { server, served, ...http2Lifecycle(server) };
}

/** Listening and a graceful close (open sessions closed, destroyed after the grace) for an HTTP/2 server. */
export function http2Lifecycle(server: http2.Http2SecureServer): Pick<RpcServer, "listen" | "close"> {
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (s) => {
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });
  return {
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

export type NodeHandler = (req: http2.Http2ServerRequest | IncomingMessage, res: http2.Http2ServerResponse | ServerResponse) => void;

/** How long a caller may keep a stream open after the answer to its call was sent. */
const AFTER_ANSWER_MS = 1000;

/**
 * Once the answer to a call of one of `paths` has been sent, a request the
 * caller has not ended is of no more use: after AFTER_ANSWER_MS its HTTP/2
 * stream is closed with RST_STREAM NO_ERROR, as the gRPC spec allows.
 * Otherwise a caller that never ends its request (answered at its deadline,
 * or refused early) would hold the stream, a share of the connection's
 * streams and what it buffered, for as long as it likes. (The grace keeps
 * the reset clear of the answer's last frames.) Links (bidirectional
 * calls) are left out: their sessions end them.
 */
export function closingUnfinishedRequests(handler: NodeHandler, served: readonly DescMethod[], clock: Clock): NodeHandler {
  const paths = new Set(served.filter((m) => m.methodKind !== "bidi_streaming").map((m) => `/${pathOf(m)}`));
  return (req, res) => {
    if ("stream" in req && paths.has((req.url ?? "").split("?")[0]!)) {
      const stream = req.stream;
      stream.once("finish", () => {
        if (stream.closed) return;
        const timer = clock.setTimeout(() => {
          if (!stream.closed && !stream.destroyed) stream.close(http2.constants.NGHTTP2_NO_ERROR);
        }, AFTER_ANSWER_MS);
        stream.once("close", () => timer.cancel());
      });
    }
    handler(req, res);
  };
}

/**
 * The boundary of a connect-node server: finds the method's declaration
 * (none: refused), lets an open method through, has `decide` allow or
 * refuse any other, stores the grant for the handler, and maps every error
 * the call ends with — refusals, domain errors of the handler, requests
 * that do not decode — through common/rpc-errors.ts, logging each refusal.
 */
export function boundaryInterceptor(opts: { declarations: DeclarationTable; decide: (call: Call) => Promise<Grant>; log: Logger }): Interceptor {
  return (next) => async (req) => {
    const peer = req.contextValues.get(peerKey);
    const method = pathOf(req.method);
    const refused = (err: unknown): ConnectError => {
      const wire = toConnectError(err);
      const fields = { method, peer: peer ? formatIdentity(peer) : "unidentified", code: wire.code, err };
      if (wire.code === Code.Internal) opts.log.error("request failed", fields);
      else if (wire.code === Code.InvalidArgument && isMalformed(err)) opts.log.warn("malformed request refused", fields);
      else if (wire.code !== Code.Canceled) opts.log.info("request refused", fields);
      return wire;
    };
    let grant: Grant;
    try {
      const declared = opts.declarations.get(req.method);
      if (!declared) throw new PermissionDeniedError(`${method} is not served: it has no authorization declaration`);
      grant = "open" in declared.declaration
        ? { peer, action: "open", by: "open" }
        : await opts.decide({ declared, peer, revoked: req.contextValues.get(revokedKey), request: req.stream ? undefined : req.message });
    } catch (err) {
      throw refused(err);
    }
    req.contextValues.set(grantKey, grant);
    if (!req.stream) {
      try {
        return await next(req);
      } catch (err) {
        throw refused(err);
      }
    }
    try {
      // connect-es aborts the signal at the call's deadline but keeps waiting for a client stream's next
      // message; a bidirectional link watches the signal itself (common/connect-link.ts).
      const requests = req.method.methodKind === "client_streaming" ? failingOnAbort(req.message, req.signal) : req.message;
      const res = await next({ ...req, message: decoded(requests) });
      if (!res.stream) return res;
      return { ...res, message: mapped(res.message, refused) };
    } catch (err) {
      throw refused(err);
    }
  };
}

/** A stream's requests; one that does not decode ends the stream as a malformed request. */
async function* decoded<T>(messages: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (err) {
    if (isDecodeFailure(err)) throw new MalformedRequestError("the request is not a valid protobuf message", { cause: err });
    throw err;
  }
}

async function* mapped<T>(messages: AsyncIterable<T>, refused: (err: unknown) => ConnectError): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (err) {
    throw refused(err);
  }
}

/** A request message that does not decode. */
class MalformedRequestError extends InvalidArgumentError {}

function isMalformed(err: unknown): boolean {
  return err instanceof MalformedRequestError || isDecodeFailure(err) || (err instanceof Error && isDecodeFailure(err.cause));
}
