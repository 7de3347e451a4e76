/**
 * connect-es's gRPC transport, with the hand codecs (common/hand-codecs.ts)
 * for the streams whose messages have one.
 *
 * connect-es serializes every message with protobuf-es (`toBinary`,
 * `fromBinary`) and takes no codec of its own: its binary options only say
 * whether unknown fields are kept, and interceptors see messages, not
 * bytes. The proxy's link to the controller is a connect-es stream, so its
 * hand codecs (common/proxy-link-wire.ts) are plugged in here, as a
 * Transport — connect-es's own extension point — whose streaming calls are
 * connect-es's gRPC protocol step for step (its transport's `stream`, built
 * from the same exported parts: envelopes, headers, trailers, limits,
 * errors) with one difference: the serialization. Unary calls, and streams
 * with no hand codec, go through connect-es's transport unchanged.
 */
import { fromBinary, toBinary, type DescMessage, type DescMethodStreaming, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextValues, type ContextValues, type StreamResponse, type Transport } from "@connectrpc/connect";
import {
  createMethodUrl,
  limitSerialization,
  pipe,
  runStreamingCall,
  transformJoinEnvelopes,
  transformDecompressEnvelope,
  transformParseEnvelope,
  transformSerializeEnvelope,
  transformSplitEnvelope,
  type Serialization,
} from "@connectrpc/connect/protocol";
import { requestHeaderWithCompression, validateResponseWithCompression, validateTrailer } from "@connectrpc/connect/protocol-grpc";
import { createGrpcTransport, createNodeHttpClient, type Http2SessionManager } from "@connectrpc/connect-node";
import { handDecoderOf, handEncoderOf } from "./hand-codecs.js";

export interface HandTransportOptions {
  baseUrl: string;
  sessionManager: Http2SessionManager;
  readMaxBytes: number;
  writeMaxBytes: number;
}

const reason = (e: unknown): string => (e instanceof Error ? e.message : String(e));

/**
 * The serialization of a stream's messages: the hand codec where one is
 * registered, else protobuf-es, with connect-es's own error words and
 * size limits (its createBinarySerialization and limitSerialization).
 */
function serializationOf<D extends DescMessage>(desc: D, limits: { readMaxBytes: number; writeMaxBytes: number }): Serialization<MessageShape<D>> {
  const encode = handEncoderOf(desc) ?? ((m: MessageShape<D>) => toBinary(desc, m));
  const decode = handDecoderOf(desc) ?? ((b: Uint8Array) => fromBinary(desc, b));
  return limitSerialization(
    {
      serialize(data) {
        try {
          // A view of the encoding, as connect-es's own serialization returns (never of shared memory).
          return encode(data) as Uint8Array<ArrayBuffer>;
        } catch (e) {
          throw new ConnectError(`serialize binary: ${reason(e)}`, Code.Internal);
        }
      },
      parse(data) {
        try {
          return decode(data);
        } catch (e) {
          throw new ConnectError(`parse binary: ${reason(e)}`, Code.Internal);
        }
      },
    },
    limits,
  );
}

/** A gRPC transport over HTTP/2 (no compression either way), with hand codecs for the streams that have them. */
export function createHandCodecTransport(opts: HandTransportOptions): Transport {
  const base = createGrpcTransport({ baseUrl: opts.baseUrl, sessionManager: opts.sessionManager, readMaxBytes: opts.readMaxBytes, writeMaxBytes: opts.writeMaxBytes, acceptCompression: [] });
  const httpClient = createNodeHttpClient({ httpVersion: "2", sessionProvider: () => opts.sessionManager });
  const limits = { readMaxBytes: opts.readMaxBytes, writeMaxBytes: opts.writeMaxBytes };
  return {
    unary: (...args) => base.unary(...args),
    stream<I extends DescMessage, O extends DescMessage>(
      method: DescMethodStreaming<I, O>,
      signal: AbortSignal | undefined,
      timeoutMs: number | undefined,
      header: Parameters<Transport["stream"]>[3],
      input: AsyncIterable<MessageInitShape<I>>,
      contextValues?: ContextValues,
    ): Promise<StreamResponse<I, O>> {
      if (!handEncoderOf(method.input) && !handDecoderOf(method.output)) return base.stream(method, signal, timeoutMs, header, input, contextValues);
      const serializeInput = serializationOf(method.input, limits);
      const parseOutput = serializationOf(method.output, limits);
      const timeout = timeoutMs !== undefined && timeoutMs <= 0 ? undefined : timeoutMs;
      return runStreamingCall<I, O>({
        interceptors: [],
        signal,
        timeoutMs: timeout,
        req: {
          stream: true,
          service: method.parent,
          method,
          requestMethod: "POST",
          url: createMethodUrl(opts.baseUrl, method),
          header: requestHeaderWithCompression(true, timeout, header, [], null),
          contextValues: contextValues ?? createContextValues(),
          message: input,
        },
        next: async (req) => {
          const uRes = await httpClient({
            url: req.url,
            method: "POST",
            header: req.header,
            signal: req.signal,
            // connect-es hands the messages over as they were given (create() is the caller's).
            body: pipe(req.message as AsyncIterable<MessageShape<I>>, transformSerializeEnvelope(serializeInput), transformJoinEnvelopes(), { propagateDownStreamError: true }),
          });
          const { compression, foundStatus, headerError } = validateResponseWithCompression([], uRes.status, uRes.header);
          if (headerError) throw headerError;
          return {
            ...req,
            header: uRes.header,
            trailer: uRes.trailer,
            message: pipe(
              uRes.body,
              transformSplitEnvelope(opts.readMaxBytes),
              transformDecompressEnvelope(compression ?? null, opts.readMaxBytes),
              transformParseEnvelope(parseOutput),
              async function* (messages) {
                yield* messages;
                if (!foundStatus) validateTrailer(uRes.trailer, uRes.header);
              },
              { propagateDownStreamError: true },
            ),
          };
        },
      });
    },
  };
}
