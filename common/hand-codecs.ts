/**
 * Message types read or written by hand, exactly as protobuf-es does: the
 * proxy's ends of both links (common/agent-link-wire.ts for the host link,
 * common/proxy-link-wire.ts for the controller link). Each is registered for
 * the direction the proxy takes it in, so a daemon (which sends
 * AgentStreamRequest and takes AgentStreamResponse) and the controller
 * (whose connect-node server decodes and encodes through connect-es) use
 * protobuf-es as before. grpc-js links (common/grpc-link.ts) and the
 * connect-es gRPC transport the proxy dials the controller with
 * (common/connect-dial.ts) both look here.
 */
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { AgentStreamRequestSchema, AgentStreamResponseSchema } from "../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { decodeAgentRequest, encodeAgentResponse } from "./agent-link-wire.js";
import { decodeProxyResponse, encodeProxyRequest } from "./proxy-link-wire.js";

interface HandCodec {
  encode?: (m: never) => Uint8Array;
  decode?: (b: Uint8Array) => unknown;
}

const handCodecs = new Map<DescMessage, HandCodec>([
  [AgentStreamRequestSchema, { decode: decodeAgentRequest }],
  [AgentStreamResponseSchema, { encode: encodeAgentResponse }],
  [ProxyStreamRequestSchema, { encode: encodeProxyRequest }],
  [ProxyStreamResponseSchema, { decode: decodeProxyResponse }],
]);

/** The hand encoder of a message type, if one is registered. */
export function handEncoderOf<D extends DescMessage>(schema: D): ((m: MessageShape<D>) => Uint8Array) | undefined {
  return handCodecs.get(schema)?.encode as ((m: MessageShape<D>) => Uint8Array) | undefined;
}

/** The hand decoder of a message type, if one is registered. */
export function handDecoderOf<D extends DescMessage>(schema: D): ((b: Uint8Array) => MessageShape<D>) | undefined {
  return handCodecs.get(schema)?.decode as ((b: Uint8Array) => MessageShape<D>) | undefined;
}
