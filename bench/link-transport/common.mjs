// Shared pieces of the link-transport benchmark: messages, the grpc-js method
// definition built from the protobuf-es v2 schemas, memory snapshots.
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  AgentLinkService,
  AgentStreamRequestSchema,
  AgentStreamResponseSchema,
} from "./.build/agent_link_pb.js";
import { OutputAckSchema, OutputChunkSchema, OutputStream } from "./.build/task_pb.js";
import { AgentHelloSchema, AgentWelcomeSchema } from "./.build/agent_link_pb.js";
import { HostFactsSchema } from "./.build/host_pb.js";
import { setTimeout as sleep } from "node:timers/promises";

export { AgentLinkService, AgentStreamRequestSchema, AgentStreamResponseSchema };

export const METHOD_PATH = "/rexmesh.v1.AgentLinkService/AgentStream";

const asBuffer = (u8) => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);

/** grpc-js MethodDefinition for AgentStream (bidi) with protobuf-es v2 serializers. */
export const agentStreamMethod = {
  path: METHOD_PATH,
  requestStream: true,
  responseStream: true,
  requestSerialize: (m) => asBuffer(toBinary(AgentStreamRequestSchema, m)),
  requestDeserialize: (b) => fromBinary(AgentStreamRequestSchema, b),
  responseSerialize: (m) => asBuffer(toBinary(AgentStreamResponseSchema, m)),
  responseDeserialize: (b) => fromBinary(AgentStreamResponseSchema, b),
};

export function helloFrame(hostId) {
  return create(AgentStreamRequestSchema, {
    hello: create(AgentHelloSchema, {
      hostId,
      heartbeatMs: 15000,
      facts: create(HostFactsSchema, {
        os: "linux", osFamily: "debian", arch: "x86_64", kernel: "6.1.0", hostname: hostId,
        addresses: ["127.0.0.1"], daemonVersion: "0.1.0", tools: ["exec", "shell"],
      }),
    }),
    credits: 4,
  });
}

export function chunkFrame(taskId, seq, data) {
  return create(AgentStreamRequestSchema, {
    output: [create(OutputChunkSchema, { taskId, seq: BigInt(seq), stream: OutputStream.STDOUT, data })],
  });
}

const welcome = create(AgentStreamResponseSchema, {
  welcome: create(AgentWelcomeSchema, { proxy: "proxy-bench", region: "bench", heartbeatMs: 15000 }),
});

/**
 * The server's reaction to one request frame: a welcome for a hello (after
 * checking that hello.host_id equals the CN of the peer certificate), one
 * OutputAck per output chunk. Returns undefined when nothing is to be sent.
 */
export function answer(req, peerCN, counters) {
  if (req.hello) {
    if (req.hello.hostId !== peerCN) counters.peerMismatch++;
    counters.hellos++;
    return welcome;
  }
  if (req.output.length > 0) {
    counters.frames++;
    return create(AgentStreamResponseSchema, {
      outputAcks: req.output.map((c) => create(OutputAckSchema, { taskId: c.taskId, seq: c.seq })),
    });
  }
  return undefined;
}

/** Memory after full GCs (needs --expose-gc). */
export async function memSnapshot() {
  for (let i = 0; i < 3; i++) {
    global.gc?.();
    await sleep(50);
  }
  const m = process.memoryUsage();
  return { rss: m.rss, heapUsed: m.heapUsed, heapTotal: m.heapTotal, external: m.external, arrayBuffers: m.arrayBuffers };
}

// ---- minimal gRPC framing over node:http2 (the "node-http2" floor) ----

/** 5-byte gRPC length prefix + message. */
export function grpcFrame(bytes) {
  const out = Buffer.allocUnsafe(5 + bytes.byteLength);
  out[0] = 0;
  out.writeUInt32BE(bytes.byteLength, 1);
  out.set(bytes, 5);
  return out;
}

/** Feeds DATA chunks, calls onMessage(Uint8Array) per complete gRPC message. */
export function grpcDeframer(onMessage) {
  let buf = Buffer.alloc(0);
  return (chunk) => {
    buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
    while (buf.length >= 5) {
      const len = buf.readUInt32BE(1);
      if (buf.length < 5 + len) break;
      onMessage(buf.subarray(5, 5 + len));
      buf = buf.subarray(5 + len);
    }
    if (buf.length === 0) buf = Buffer.alloc(0);
  };
}
