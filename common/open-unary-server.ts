import { fromBinary, toBinary, type DescMethodUnary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import type { Credentials } from "../certs/files.js";
import type { Logger } from "./logger.js";
import { toGrpcStatus } from "./rpc-errors.js";

/** A unary method served to callers without a certificate; the handler sees only the request. */
export interface OpenUnaryHandler {
  method: DescMethodUnary;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- each handler names its own request type
  handle: (request: any) => Promise<unknown>;
}

export interface OpenUnaryServer {
  listen(host: string, port: number): Promise<number>;
  close(graceMs: number): Promise<void>;
}

/**
 * A grpc-js server with TLS that does not ask for a client certificate,
 * serving only the unary methods given (enrollment: the caller has no
 * certificate yet). Clients still verify this server against the mesh CA.
 * Every other path is UNIMPLEMENTED, and messages are kept small because
 * the callers are unauthenticated.
 */
export function createOpenUnaryServer(opts: { creds: Credentials; handlers: OpenUnaryHandler[]; log: Logger; maxMessageBytes?: number; maxConcurrentStreams?: number }): OpenUnaryServer {
  const max = opts.maxMessageBytes ?? 64 * 1024;
  const server = new grpc.Server({
    "grpc.max_receive_message_length": max,
    "grpc.max_send_message_length": max,
    "grpc.max_concurrent_streams": opts.maxConcurrentStreams ?? 128,
  });
  for (const h of opts.handlers) {
    const m = h.method;
    server.addService(
      {
        [m.localName]: {
          path: `/${m.parent.typeName}/${m.name}`,
          requestStream: false,
          responseStream: false,
          requestSerialize: (x: any) => Buffer.from(toBinary(m.input, x)),
          requestDeserialize: (b: Buffer) => fromBinary(m.input, b),
          responseSerialize: (x: any) => Buffer.from(toBinary(m.output, x)),
          responseDeserialize: (b: Buffer) => fromBinary(m.output, b),
        },
      },
      {
        [m.localName]: (call: grpc.ServerUnaryCall<any, unknown>, callback: grpc.sendUnaryData<unknown>) => {
          Promise.resolve()
            .then(() => h.handle(call.request))
            .then(
              (res) => callback(null, res),
              (err) => {
                const { code, details } = toGrpcStatus(err);
                callback({ code, details });
              },
            );
        },
      },
    );
  }
  const credentials = grpc.ServerCredentials.createSsl(null, [{ private_key: Buffer.from(opts.creds.keyPem), cert_chain: Buffer.from(opts.creds.certPem) }], false);
  return {
    listen: (host, port) =>
      new Promise((resolve, reject) =>
        server.bindAsync(`${host.includes(":") ? `[${host}]` : host}:${port}`, credentials, (err, bound) => (err ? reject(err) : resolve(bound))),
      ),
    close: (graceMs) =>
      new Promise<void>((resolve) => {
        const force = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        force.unref();
        server.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      }),
  };
}
