import type { DescMessage } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";
import { countElements, MAX_MESSAGE_ELEMENTS } from "./decode-budget.js";
import { asHandlerOf } from "./undecodable-request.js";

/** A connect-es handler whose request messages are counted before it decodes them (see {@link countingMessages}). */
export function countingRequests(handler: UniversalHandler): UniversalHandler {
  const desc = handler.method.input;
  const wrapped = (req: UniversalServerRequest) => {
    const body = req.body;
    if (typeof body !== "object" || body === null || !(Symbol.asyncIterator in body)) return handler(req);
    return handler({ ...req, body: countingMessages(body as AsyncIterable<Uint8Array>, desc, req.header.get("content-type") ?? "") });
  };
  return asHandlerOf(handler, wrapped);
}

/**
 * The same bound for connect-es servers (the controller's listeners), which
 * decode a request body themselves: the body is passed on message by
 * message, each counted first, and a message over the budget ends the body
 * with INVALID_ARGUMENT before connect-es makes an object of it. Binary
 * messages only — gRPC, gRPC-Web and Connect streaming envelopes, or a
 * Connect unary body of application/proto; JSON is left as it is (parsing
 * it is the decoding). Compressed envelopes are not counted (a known gap:
 * gzip of a few KiB can inflate to a 16 MiB message of millions of
 * elements; refusing compressed requests would close it).
 */
export function countingMessages(body: AsyncIterable<Uint8Array>, desc: DescMessage, contentType: string): AsyncIterable<Uint8Array> {
  const type = contentType.split(";")[0]!.trim().toLowerCase();
  const binary = type === "application/proto" || type === "application/grpc" || type === "application/grpc+proto" || type === "application/grpc-web" || type === "application/grpc-web+proto" || type === "application/connect+proto";
  if (!binary) return body;
  const enveloped = type !== "application/proto";
  const refuse = () => new ConnectError(`the ${desc.name} message holds more than ${MAX_MESSAGE_ELEMENTS} elements: refused before decoding`, Code.InvalidArgument);
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
        if ((envelope[0]! & 1) === 0 && countElements(desc, envelope.subarray(5)) === Infinity) throw refuse();
        yield envelope;
      }
    }
    if (heldBytes === 0) return;
    const rest = take(heldBytes);
    // A unary proto body is one message; an incomplete envelope is left to connect-es to report.
    if (!enveloped && countElements(desc, rest) === Infinity) throw refuse();
    yield rest;
  })();
}
