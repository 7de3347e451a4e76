import { type DescMessage, type DescMethodBiDiStreaming, type DescMethodUnary, type MessageShape } from "@bufbuild/protobuf";
import { decodeBounded } from "./decode-budget.js";
import { handDecoderOf, handEncoderOf } from "./hand-codecs.js";
import * as grpc from "@grpc/grpc-js";
import { createServer, type Socket } from "node:net";
import type { PeerCertificate } from "node:tls";
import type { Credentials } from "../certs/files.js";
import { identityFromCertificate, type PeerIdentity, type Role } from "../certs/identity.js";
import { clientTlsOptions } from "../certs/tls.js";
import { systemClock, type Clock, type Timer } from "./clock.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";
import { UnauthenticatedError } from "./errors.js";
import { untilClosed, type FrameLink, type LinkConnection } from "./frame-link.js";
import { encodeWithWireOutput } from "./output-wire.js";
import { LIMITS } from "./limits.js";
import type { Logger } from "./logger.js";
import { toGrpcStatus } from "./rpc-errors.js";

/**
 * Bidirectional links over @grpc/grpc-js. Used for AgentLink, where a proxy
 * holds one mostly idle stream per host: measured here, grpc-js keeps an
 * idle mTLS stream in about 85 KiB of server memory against about 122 KiB
 * for connect-node, and spends less CPU per small frame (docs/transport.md).
 */

type Method<I extends DescMessage, O extends DescMessage> = DescMethodBiDiStreaming<I, O>;

const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
};

/**
 * An idle host link carries an application frame (the link heartbeat) only
 * every this many heartbeat intervals: 2 minutes at the default 10 s.
 * Whether the peer is alive is asked every interval with an HTTP/2 PING
 * instead, which the peer's nghttp2 answers without a frame reaching
 * JavaScript (docs/fan-out.md, "Idle links"); the application heartbeat
 * stays as a backstop (three of its intervals). A frame each way through
 * grpc-js costs a proxy more than a PING: at 6 instead of 12 they were a
 * sixth of an idle proxy's CPU.
 */
export const IDLE_FRAME_INTERVALS = 12;

/**
 * HTTP/2 keepalive every `ms`: a PING, and the connection dropped when its
 * answer has not come within two more intervals (the time the link
 * heartbeat took to declare a silent peer dead: three intervals).
 */
export function keepaliveOptions(ms: number): grpc.ChannelOptions {
  return { "grpc.keepalive_time_ms": ms, "grpc.keepalive_timeout_ms": 2 * ms, "grpc.keepalive_permit_without_calls": 1 };
}

function pathOf(method: { parent: { typeName: string }; name: string }): string {
  return `/${method.parent.typeName}/${method.name}`;
}

class CallLink<Out, In> implements FrameLink<Out, In> {
  readonly closed: Promise<void>;
  private done = false;
  private resolveClosed!: () => void;

  private released = false;

  constructor(
    private readonly call: grpc.ClientDuplexStream<Out, In> | grpc.ServerDuplexStream<In, Out>,
    private readonly end: (error?: Error) => void,
    private readonly release: () => void = () => {},
    private readonly server?: { peer?: PeerIdentity },
    readonly connection?: LinkConnection,
  ) {
    this.closed = new Promise((r) => (this.resolveClosed = r));
    call.on("close", () => this.ended());
    call.on("error", () => this.ended());
  }

  /**
   * A stream's default async iterator destroys the stream when the peer
   * half-closes; a destroyed grpc-js server call never sends its status, so
   * the peer would wait for one forever. The stream ends through close().
   */
  get incoming(): AsyncIterable<In> {
    const call = this.call;
    return untilClosed({ [Symbol.asyncIterator]: () => call.iterator({ destroyOnReturn: false }) as AsyncIterator<In> }, this.closed);
  }

  get backlog(): number {
    return this.call.writableLength;
  }

  get peer(): PeerIdentity | undefined {
    return this.server?.peer;
  }

  whenWritable(frames: number): Promise<void> {
    if (this.done || this.call.writableLength < frames) return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (this.done || this.call.writableLength < frames) {
          this.call.off("drain", check);
          resolve();
        }
      };
      this.call.on("drain", check);
      this.closed.then(check, check);
    });
  }

  send(frame: Out): void {
    if (this.done || this.call.writableEnded || this.call.destroyed) return;
    (this.call as grpc.ClientDuplexStream<Out, In>).write(frame);
  }

  close(error?: Error): void {
    if (!this.done) {
      this.done = true;
      this.end(error);
    }
    this.ended();
  }

  /** The stream is over, whoever ended it: release what it held, once. */
  private ended(): void {
    this.done = true;
    if (!this.released) {
      this.released = true;
      this.release();
    }
    this.resolveClosed();
  }
}

export interface GrpcLinkServer {
  /** Binds and starts; resolves to the port bound. */
  listen(host: string, port: number): Promise<number>;
  /** Stops taking new streams; after graceMs closes the ones still open. */
  close(graceMs: number): Promise<void>;
}

/** A unary method served beside a link, with the caller's identity from its certificate. */
export interface UnaryHandler {
  method: DescMethodUnary;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- each handler names its own request type
  handle: (request: any, peer: PeerIdentity) => Promise<unknown>;
}

function peerOf(call: { getAuthContext(): { sslPeerCertificate?: unknown } }): PeerIdentity {
  const cert = call.getAuthContext().sslPeerCertificate as PeerCertificate | undefined;
  if (!cert) throw new UnauthenticatedError("the client presented no certificate");
  return identityFromCertificate(cert);
}

/** A bidirectional method served with session logic written against FrameLink. */
export interface LinkHandler<I extends DescMessage = DescMessage, O extends DescMessage = DescMessage> {
  method: Method<I, O>;
  serve: (link: FrameLink<MessageShape<O>, MessageShape<I>>, peer: PeerIdentity) => Promise<void>;
}

/**
 * A grpc-js server with mutual TLS serving bidirectional methods with
 * session logic written against FrameLink. The peer's identity comes from
 * its verified certificate; the session's outcome becomes the stream's status.
 */
export function createGrpcLinkServer<I extends DescMessage, O extends DescMessage>(opts: {
  creds: Credentials;
  method: Method<I, O>;
  serve: (link: FrameLink<MessageShape<O>, MessageShape<I>>, peer: PeerIdentity) => Promise<void>;
  /** More bidirectional methods on the same server (a proxy's session legs beside AgentLink). */
  links?: LinkHandler[];
  log: Logger;
  unary?: UnaryHandler[];
  /** Adds more services to the same server (health checking, ...). */
  extend?: (server: grpc.Server) => void;
  /** Times the arrival of unary requests (LIMITS.requestArrivalMs); the system clock by default. */
  clock?: Clock;
}): GrpcLinkServer {
  const server = new grpc.Server({
    ...CHANNEL_OPTIONS,
    // The server asks no client whether it is alive: a link's serve watches the connection of a peer that pings
    // (FrameLink.connection; common/silence-watch.ts). A connection with no stream (an operator's idle channel) is
    // closed after a while.
    "grpc.max_connection_idle_ms": IDLE_CONNECTION_MS,
    "grpc.max_concurrent_streams": 4,
    interceptors: [boundUnaryArrival(LIMITS.requestArrivalMs, opts.clock ?? systemClock)],
  });
  const connections = new Connections();
  addLinkMethod(server, { method: opts.method, serve: opts.serve } as unknown as LinkHandler, connections);
  for (const l of opts.links ?? []) addLinkMethod(server, l, connections);
  for (const u of opts.unary ?? []) {
    addUnaryMethod(server, u.method, (call) => u.handle(call.request, peerOf(call)), (err) => opts.log.info("request refused", { method: u.method.name, err }));
  }
  opts.extend?.(server);
  const credentials = grpc.ServerCredentials.createSsl(
    Buffer.from(opts.creds.caPem),
    [{ private_key: Buffer.from(opts.creds.keyPem), cert_chain: Buffer.from(opts.creds.certPem) }],
    true,
  );
  return serverLifecycle(server, credentials, connections);
}

/** A connection that carries no stream is closed after this long (grpc.max_connection_idle_ms). */
const IDLE_CONNECTION_MS = 5 * 60_000;

/**
 * The server's TCP connections by the peer address grpc-js reports for a
 * call (`getPeer()`: address and port), so that a stream's serve can watch
 * and drop its own connection. The server owns its listener and hands each
 * connection to grpc-js (`createConnectionInjector`), which does the TLS
 * and HTTP/2 on it as on a port it bound itself.
 */
class Connections {
  private readonly byPeer = new Map<string, Socket>();

  add(socket: Socket): void {
    const key = `${socket.remoteAddress}:${socket.remotePort}`;
    this.byPeer.set(key, socket);
    socket.once("close", () => {
      if (this.byPeer.get(key) === socket) this.byPeer.delete(key);
    });
  }

  of(peer: string): LinkConnection | undefined {
    const socket = this.byPeer.get(peer);
    if (!socket) return undefined;
    return {
      get bytesRead() {
        return socket.bytesRead;
      },
      destroy: () => socket.destroy(),
    };
  }

  destroyAll(): void {
    for (const s of this.byPeer.values()) s.destroy();
  }
}

/**
 * grpc-js's serializer for a message type: the encoding as a Buffer view (not
 * a copy: grpc-js copies it into its frame anyway), output chunks in their
 * wire form (common/output-wire.ts), by hand where a hand encoder is
 * registered (common/hand-codecs.ts).
 */
function serializer<D extends DescMessage>(schema: D): (m: MessageShape<D>) => Buffer {
  const encode = handEncoderOf(schema) ?? encodeWithWireOutput(schema);
  return (m) => {
    const u8 = encode(m);
    return Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
  };
}

/** grpc-js's deserializer for a message type: bounded (decodeBounded), by hand where a hand decoder is registered. */
function deserializer<D extends DescMessage>(schema: D): (b: Buffer) => MessageShape<D> {
  return handDecoderOf(schema) ?? ((b) => decodeBounded(schema, b));
}

function addLinkMethod(server: grpc.Server, { method, serve }: LinkHandler, connections: Connections): void {
  type In = MessageShape<typeof method.input>;
  type Out = MessageShape<typeof method.output>;
  const definition: grpc.ServiceDefinition = {
    [method.localName]: {
      path: pathOf(method),
      requestStream: true,
      responseStream: true,
      requestSerialize: serializer(method.input),
      requestDeserialize: deserializer(method.input),
      responseSerialize: serializer(method.output),
      responseDeserialize: deserializer(method.output),
    },
  };
  const handler = (call: grpc.ServerDuplexStream<In, Out>) => {
    const fail = (err: unknown) => {
      const { code, details } = toGrpcStatus(err);
      call.emit("error", { code, details });
    };
    let peer: PeerIdentity;
    try {
      peer = peerOf(call);
    } catch (err) {
      fail(err);
      return;
    }
    const link = new CallLink<Out, In>(
      call,
      (error) => {
        if (call.writableEnded || call.destroyed) return;
        if (error) fail(error);
        else call.end();
      },
      undefined,
      undefined,
      connections.of(call.getPeer()),
    );
    serve(link, peer).then(
      () => link.close(),
      (err) => link.close(err instanceof Error ? err : new Error(String(err))),
    );
  };
  server.addService(definition, { [method.localName]: handler });
}

/**
 * grpc-js reads a unary call's request whole before its handler runs, and
 * waits for it as long as the caller's grpc-timeout allows, or forever
 * without one: a caller could hold a call with a frame half sent. This
 * interceptor ends a unary call (or a server-streaming one) whose request
 * has not arrived within `maxMs` with DEADLINE_EXCEEDED; what the caller
 * sends after that is dropped, and the handler never runs. A shorter
 * grpc-timeout is grpc-js's own to enforce, as before.
 */
export function boundUnaryArrival(maxMs: number, clock: Clock): grpc.ServerInterceptor {
  return (method, call) => {
    if (method.requestStream) return new grpc.ServerInterceptingCall(call);
    let timer: Timer | undefined;
    let expired = false;
    const stop = () => {
      timer?.cancel();
      timer = undefined;
    };
    return new grpc.ServerInterceptingCall(call, {
      start: (next) => {
        timer = clock.setTimeout(() => {
          expired = true;
          call.sendStatus({ code: grpc.status.DEADLINE_EXCEEDED, details: `the request had not arrived within ${maxMs / 1000} s` });
        }, maxMs);
        next({
          onReceiveMessage: (message, nextMessage) => {
            if (!expired) nextMessage(message);
          },
          onReceiveHalfClose: (nextHalfClose) => {
            stop();
            if (!expired) nextHalfClose();
          },
          onCancel: stop,
        });
      },
      sendStatus: (status, nextStatus) => {
        stop();
        nextStatus(status);
      },
    });
  };
}

/**
 * Registers a unary method on a grpc-js server: protobuf-es serialization,
 * and domain errors turned into gRPC statuses at this one boundary.
 */
export function addUnaryMethod(
  server: grpc.Server,
  m: DescMethodUnary,
  run: (call: grpc.ServerUnaryCall<any, unknown>) => Promise<unknown>,
  onError?: (err: unknown) => void,
): void {
  server.addService(
    {
      [m.localName]: {
        path: pathOf(m),
        requestStream: false,
        responseStream: false,
        requestSerialize: serializer(m.input),
        requestDeserialize: deserializer(m.input),
        responseSerialize: serializer(m.output),
        responseDeserialize: deserializer(m.output),
      },
    },
    {
      // grpc-js types requests as any; the deserializer above makes them m.input messages.
      [m.localName]: (call: grpc.ServerUnaryCall<any, unknown>, callback: grpc.sendUnaryData<unknown>) => {
        Promise.resolve()
          .then(() => run(call))
          .then(
            (res) => callback(null, res),
            (err) => {
              onError?.(err);
              const { code, details } = toGrpcStatus(err);
              callback({ code, details });
            },
          );
      },
    },
  );
}

/** Listening (connections handed to grpc-js, see Connections) and a graceful-then-forced shutdown for a grpc-js server. */
function serverLifecycle(server: grpc.Server, credentials: grpc.ServerCredentials, connections: Connections): GrpcLinkServer {
  const injector = server.createConnectionInjector(credentials);
  const listener = createServer((socket) => {
    connections.add(socket);
    injector.injectConnection(socket);
  });
  return {
    listen: (host, port) =>
      new Promise((resolve, reject) => {
        listener.once("error", reject);
        listener.listen(port, host, () => {
          listener.off("error", reject);
          const a = listener.address();
          resolve(typeof a === "object" && a ? a.port : port);
        });
      }),
    close: (graceMs) =>
      new Promise<void>((resolve) => {
        listener.close();
        const force = setTimeout(() => {
          server.forceShutdown();
          connections.destroyAll();
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

/**
 * Opens one bidirectional stream over its own grpc-js channel (one TLS
 * connection per peer identity). Closing the link cancels the call and
 * closes the channel.
 */
export function openGrpcLink<I extends DescMessage, O extends DescMessage>(
  address: string,
  creds: Credentials,
  serverRoles: readonly Role[],
  method: Method<I, O>,
  /** Asks the server whether it is alive this often (keepaliveOptions); absent: never. */
  keepaliveMs?: number,
): FrameLink<MessageShape<I>, MessageShape<O>> {
  const tls = clientTlsOptions(creds, serverRoles);
  // The server's identity, as its certificate names it, once the handshake accepted it.
  const server: { peer?: PeerIdentity } = {};
  const credentials = grpc.credentials.createSsl(Buffer.from(creds.caPem), Buffer.from(creds.keyPem), Buffer.from(creds.certPem), {
    checkServerIdentity: (host, cert) => {
      const err = tls.checkServerIdentity(host, cert);
      if (!err) server.peer = identityFromCertificate(cert);
      return err;
    },
  });
  const client = new grpc.Client(address, credentials, keepaliveMs ? { ...CHANNEL_OPTIONS, ...keepaliveOptions(keepaliveMs) } : CHANNEL_OPTIONS);
  const call = client.makeBidiStreamRequest(
    pathOf(method),
    serializer(method.input),
    deserializer(method.output),
  );
  return new CallLink<MessageShape<I>, MessageShape<O>>(
    call,
    (error) => {
      if (error) call.cancel();
      else call.end();
    },
    () => client.close(),
    server,
  );
}

/** Calls a unary method over its own short-lived grpc-js channel. */
export function callGrpcUnary<I extends DescMessage, O extends DescMessage>(
  address: string,
  creds: Credentials,
  serverRoles: readonly Role[],
  method: DescMethodUnary<I, O>,
  request: MessageShape<I>,
): Promise<MessageShape<O>> {
  const tls = clientTlsOptions(creds, serverRoles);
  const credentials = grpc.credentials.createSsl(Buffer.from(creds.caPem), Buffer.from(creds.keyPem), Buffer.from(creds.certPem), { checkServerIdentity: tls.checkServerIdentity });
  const client = new grpc.Client(address, credentials, CHANNEL_OPTIONS);
  return new Promise<MessageShape<O>>((resolve, reject) =>
    client.makeUnaryRequest(
      pathOf(method),
      serializer(method.input),
      deserializer(method.output),
      request,
      (err, res) => (err ? reject(err) : resolve(res!)),
    ),
  ).finally(() => client.close());
}
