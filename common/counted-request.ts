import type { DescMessage } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";
import { countElements, MAX_MESSAGE_ELEMENTS } from "./decode-budget.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";
import { asHandlerOf } from "./undecodable-request.js";

/** A connect-es handler whose request messages are counted before it decodes them (see {@link countingMessages}). */
export function countingRequests(handler: UniversalHandler): UniversalHandler {
  const desc = handler.method.input;
  const wrapped = (req: UniversalServerRequest) => {
    const body = req.body;
    if (typeof body !== "object" || body === null || !(Symbol.asyncIterator in body)) return handler(req);
    const type = req.header.get("content-type") ?? "";
    return handler({ ...req, body: countingMessages(body as AsyncIterable<Uint8Array>, desc, type, req.header.get(encodingHeader(type)) ?? "") });
  };
  return asHandlerOf(handler, wrapped);
}

/** The header naming a request's compression, by its content type's protocol. */
function encodingHeader(contentType: string): string {
  const type = contentType.split(";")[0]!.trim().toLowerCase();
  if (type.startsWith("application/grpc")) return "grpc-encoding";
  if (type.startsWith("application/connect+")) return "connect-content-encoding";
  return "content-encoding";
}

/** What connect-es accepts (its defaults), by the name a request gives. */
const DECOMPRESSORS = new Map([compressionGzip, compressionBrotli].map((c) => [c.name, c]));

/**
 * The same bound for connect-es servers (the controller's listeners), which
 * decode a request body themselves: the body is passed on message by
 * message, each counted first, and a message over the budget ends the body
 * with INVALID_ARGUMENT before connect-es makes an object of it. Binary
 * messages only — gRPC, gRPC-Web and Connect streaming envelopes, or a
 * Connect unary body of application/proto; JSON is left as it is (parsing
 * it is the decoding). A compressed message (`encoding` names how: gzip or
 * br, as connect-es accepts) is inflated within the message size limit to be
 * counted, then passed on as it came (connect-es inflates it again): a few
 * KiB of gzip inflate to 16 MiB of millions of empty elements. One that
 * does not inflate is refused as connect-es would refuse it; an encoding
 * connect-es does not know is left to it to refuse.
 */
export function countingMessages(body: AsyncIterable<Uint8Array>, desc: DescMessage, contentType: string, encoding = ""): AsyncIterable<Uint8Array> {
  const type = contentType.split(";")[0]!.trim().toLowerCase();
  const binary = type === "application/proto" || type === "application/grpc" || type === "application/grpc+proto" || type === "application/grpc-web" || type === "application/grpc-web+proto" || type === "application/connect+proto";
  if (!binary) return body;
  const enveloped = type !== "application/proto";
  const refuse = () => new ConnectError(`the ${desc.name} message holds more than ${MAX_MESSAGE_ELEMENTS} elements: refused before decoding`, Code.InvalidArgument);
  const decompressor = DECOMPRESSORS.get(encoding.trim().toLowerCase());
  /** Counts one message as sent, compressed or not; true when it is within the budget (or left to connect-es). */
  const within = async (message: Uint8Array, compressed: boolean): Promise<boolean> => {
    if (!compressed) return countElements(desc, message) !== Infinity;
    if (!decompressor) return true;
    return countElements(desc, await decompressor.decompress(message, MAX_MESSAGE_BYTES)) !== Infinity;
  };
  return (async function* () {
    const held: Uint8Array[] = [];
    let heldBytes = 0;
    const take = (n: number): Buffer => {
      const all = Buffer.concat(held, heldBytes);
      held.length = 0;
      if (all.length > n) held.push(all.subarray(n));
      heldBytes = all.length - n;
      return all.subarray(0, n);
    };
    for await (const chunk of body) {
      held.push(chunk);
      heldBytes += chunk.length;
      if (!enveloped) continue;
      // Every whole envelope held: counted, then passed on.
      for (;;) {
        if (heldBytes < 5) break;
        const head = held[0]!.length >= 5 ? held[0]! : Buffer.concat(held, heldBytes);
        const length = Buffer.from(head.buffer, head.byteOffset, 5).readUInt32BE(1);
        if (heldBytes < 5 + length) break;
        const envelope = take(5 + length);
        if (!(await within(envelope.subarray(5), (envelope[0]! & 1) === 1))) throw refuse();
        yield envelope;
      }
    }
    if (heldBytes === 0) return;
    const rest = take(heldBytes);
    // A unary proto body is one message; an incomplete envelope is left to connect-es to report.
    if (!enveloped && !(await within(rest, decompressor !== undefined))) throw refuse();
    yield rest;
  })();
}
