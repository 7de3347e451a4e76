import type { DescMethodUnary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import type { Credentials } from "../certs/files.js";
import type { GrpcLinkServer } from "./grpc-link.js";
import type { Logger } from "./logger.js";
import { addUnaryMethod, serverLifecycle } from "./grpc-link.js";

/** A unary method served to callers without a certificate; the handler sees only the request. */
export interface OpenUnaryHandler {
  method: DescMethodUnary;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- each handler names its own request type
  handle: (request: any) => Promise<unknown>;
}

export type { GrpcLinkServer as OpenUnaryServer } from "./grpc-link.js";

/**
 * A grpc-js server with TLS that does not ask for a client certificate,
 * serving only the unary methods given (enrollment: the caller has no
 * certificate yet). Clients still verify this server against the mesh CA.
 * Every other path is UNIMPLEMENTED, and messages are kept small because
 * the callers are unauthenticated.
 */
export function createOpenUnaryServer(opts: { creds: Credentials; handlers: OpenUnaryHandler[]; log: Logger; maxMessageBytes?: number; maxConcurrentStreams?: number }): GrpcLinkServer {
  const max = opts.maxMessageBytes ?? 64 * 1024;
  const server = new grpc.Server({
    "grpc.max_receive_message_length": max,
    "grpc.max_send_message_length": max,
    "grpc.max_concurrent_streams": opts.maxConcurrentStreams ?? 128,
  });
  for (const h of opts.handlers) addUnaryMethod(server, h.method, (call) => h.handle(call.request));
  const credentials = grpc.ServerCredentials.createSsl(null, [{ private_key: Buffer.from(opts.creds.keyPem), cert_chain: Buffer.from(opts.creds.certPem) }], false);
  return serverLifecycle(server, credentials);
}
