import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { Credentials } from "../certs/files.js";
import type { Role } from "../certs/identity.js";
import { clientTlsOptions } from "../certs/tls.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";

export interface Channel {
  readonly transport: Transport;
  /** Closes the connection and every stream on it. */
  close(reason?: Error): void;
}

/**
 * One HTTP/2 connection with mutual TLS to a rexmesh server of the given
 * roles, speaking gRPC. Every peer gets its own connection, so that its
 * certificate is the identity of every stream on it.
 */
export function openChannel(address: string, creds: Credentials, serverRoles: readonly Role[], opts: { pingIntervalMs?: number } = {}): Channel {
  const url = `https://${address}`;
  const sessions = new Http2SessionManager(
    url,
    { pingIntervalMs: opts.pingIntervalMs ?? 30_000, pingTimeoutMs: 15_000, idleConnectionTimeoutMs: 2 ** 31 - 1 },
    clientTlsOptions(creds, serverRoles),
  );
  // No compression: gzip of task and result frames cost more CPU than the link saves (docs/transport.md).
  const transport = createGrpcTransport({ baseUrl: url, sessionManager: sessions, readMaxBytes: MAX_MESSAGE_BYTES, writeMaxBytes: MAX_MESSAGE_BYTES, acceptCompression: [] });
  return { transport, close: (reason) => sessions.abort(reason) };
}

export function clientFor<S extends DescService>(service: S, channel: Channel): Client<S> {
  return createClient(service, channel.transport);
}

