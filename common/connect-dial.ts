import type { DescService } from "@bufbuild/protobuf";
import { isIP } from "node:net";
import type http2 from "node:http2";
import tls from "node:tls";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { Http2SessionManager } from "@connectrpc/connect-node";
import type { Credentials } from "../certs/files.js";
import type { Role } from "../certs/identity.js";
import { clientTlsOptions } from "../certs/tls.js";
import { createHandCodecTransport } from "./connect-hand-transport.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";
import { formatDuration } from "./duration.js";
import { LIMITS } from "./limits.js";

export interface Channel {
  readonly transport: Transport;
  /** Closes the connection and every stream on it. */
  close(reason?: Error): void;
}

export interface ChannelOptions {
  /** Keep-alive PING interval on an open connection. Default {@link LIMITS.keepaliveMs}. */
  pingIntervalMs?: number;
  /** How long a PING's answer may take; default the interval, at most {@link LIMITS.keepaliveTimeoutMs}. */
  pingTimeoutMs?: number;
  /** Dialling plus the TLS handshake; a silent address fails after this (UNAVAILABLE). Default {@link LIMITS.connectTimeoutMs}. */
  connectTimeoutMs?: number;
}

/**
 * connect-node's session manager, made safe to lose a connection at any
 * moment: every HTTP/2 session it hands out keeps an 'error' listener for
 * its whole life. (The manager removes its own when it leaves a session, but
 * Node emits a destroyed session's error only when its socket closes — after
 * a PING timeout on a silent link, that was after the manager had let go,
 * and the unhandled 'error' killed the process.) The error itself reaches
 * the calls through the manager.
 */
class GuardedSessionManager extends Http2SessionManager {
  private readonly guarded = new WeakSet<http2.ClientHttp2Session>();

  override async request(...args: Parameters<Http2SessionManager["request"]>): Promise<http2.ClientHttp2Stream> {
    const stream = await super.request(...args);
    const session = stream.session as http2.ClientHttp2Session | undefined;
    if (session && !this.guarded.has(session)) {
      this.guarded.add(session);
      session.on("error", () => undefined);
    }
    return stream;
  }
}

/**
 * One HTTP/2 connection with mutual TLS to a rexmesh server of the given
 * roles, speaking gRPC. Every peer gets its own connection, so that its
 * certificate is the identity of every stream on it. Connecting (TCP and
 * TLS) has a deadline, and a connection whose PING goes unanswered is
 * closed: calls on it end UNAVAILABLE instead of hanging.
 */
export function openChannel(address: string, creds: Credentials, serverRoles: readonly Role[], opts: ChannelOptions = {}): Channel {
  const url = `https://${address}`;
  const pingIntervalMs = opts.pingIntervalMs ?? LIMITS.keepaliveMs;
  const pingTimeoutMs = opts.pingTimeoutMs ?? Math.min(pingIntervalMs, LIMITS.keepaliveTimeoutMs);
  const connectTimeoutMs = opts.connectTimeoutMs ?? LIMITS.connectTimeoutMs;
  const tlsOptions = clientTlsOptions(creds, serverRoles);
  const sessions = new GuardedSessionManager(
    url,
    { pingIntervalMs, pingTimeoutMs, idleConnectionTimeoutMs: 2 ** 31 - 1 },
    { ...tlsOptions, createConnection: (authority: URL) => dialTls(authority, address, tlsOptions, connectTimeoutMs) },
  );
  // No compression: gzip of task and result frames cost more CPU than the link saves (docs/transport.md). The
  // controller link's frames are read and written by hand at the proxy (common/connect-hand-transport.ts).
  const transport = createHandCodecTransport({ baseUrl: url, sessionManager: sessions, readMaxBytes: MAX_MESSAGE_BYTES, writeMaxBytes: MAX_MESSAGE_BYTES });
  return { transport, close: (reason) => sessions.abort(reason) };
}

/**
 * The TLS socket of a new connection, destroyed with UNAVAILABLE if it is not
 * connected and through its handshake within `timeoutMs` (a blackholed or
 * silent address hung the CLI forever).
 */
function dialTls(authority: URL, address: string, options: tls.ConnectionOptions, timeoutMs: number): tls.TLSSocket {
  const host = authority.hostname.replace(/^\[|\]$/g, "");
  const socket = tls.connect({
    ...options,
    host,
    port: Number(authority.port || 443),
    ALPNProtocols: ["h2"],
    ...(isIP(host) ? {} : { servername: host }),
  });
  const timer = setTimeout(() => {
    socket.destroy(new ConnectError(`could not connect to ${address} within ${formatDuration(timeoutMs)}`, Code.Unavailable));
  }, timeoutMs);
  const done = () => clearTimeout(timer);
  socket.once("secureConnect", done);
  socket.once("close", done);
  return socket;
}

export function clientFor<S extends DescService>(service: S, channel: Channel): Client<S> {
  return createClient(service, channel.transport);
}
