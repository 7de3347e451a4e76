import type { DescMessage } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";
import { countElements, jsonElementsAtMost, MAX_MESSAGE_ELEMENTS } from "./decode-budget.js";
import { MAX_MESSAGE_BYTES } from "./coalescer.js";
import { asHandlerOf } from "./undecodable-request.js";
import { cutFront } from "./backlog.js";

/** A connect-es handler whose request messages are counted before it decodes them (see {@link countingMessages}). */
export function countingRequests(handler: UniversalHandler): UniversalHandler {
  const desc = handler.method.input;
  const wrapped = (req: UniversalServerRequest) => {
    const body = req.body;
    if (typeof body !== "object" || body === null || !(Symbol.asyncIterator in body)) return handler(req);
    const type = req.header.get("content-type") ?? "";
    const encodingName = encodingHeader(type);
    const encoding = req.header.get(encodingName) ?? "";
    const counted = countingMessages(body as AsyncIterable<Uint8Array>, desc, type, encoding);
    // A compressed unary body is passed on inflated (it was inflated to be counted): connect-es must not inflate it again.
    const header = counted.inflatesUnary ? withoutHeader(req.header, encodingName) : req.header;
    return handler({ ...req, header, body: counted.body });
  };
  return asHandlerOf(handler, wrapped);
}

function withoutHeader(header: Headers, name: string): Headers {
  const copy = new Headers(header);
  copy.delete(name);
  return copy;
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

const BINARY_TYPES = new Set(["application/proto", "application/grpc", "application/grpc+proto", "application/grpc-web", "application/grpc-web+proto", "application/connect+proto"]);
const JSON_TYPES = new Set(["application/json", "application/grpc+json", "application/grpc-web+json", "application/connect+json"]);
/** Content types whose body is one message, not a series of envelopes. */
const UNARY_TYPES = new Set(["application/proto", "application/json"]);

/**
 * The same bound for connect-es servers (the controller's listeners), which
 * decode a request body themselves: the body is passed on message by
 * message, each counted first, and a message over the budget ends the body
 * with INVALID_ARGUMENT before connect-es makes an object of it.
 *
 * - Binary messages (gRPC, gRPC-Web and Connect streaming envelopes, or a
 *   Connect unary body of application/proto) are counted by their wire
 *   format; JSON ones (the same framings, or application/json) by an upper
 *   bound read in one pass ({@link jsonElementsAtMost}), before connect-es
 *   parses them.
 * - A message longer than the message size limit is refused with
 *   RESOURCE_EXHAUSTED as soon as that is known (an envelope's declared
 *   length, or a unary body's bytes so far), without holding it.
 * - A compressed message (`encoding` names how: gzip or br, as connect-es
 *   accepts) is inflated within the message size limit to be counted, and
 *   passed on inflated (an envelope with its compressed flag cleared; a
 *   unary body with the header naming its encoding removed:
 *   {@link CountedBody.inflatesUnary}): a few KiB of gzip inflate to 16 MiB
 *   of millions of empty elements. One that does not inflate is refused with
 *   INVALID_ARGUMENT; an encoding connect-es does not know is left to it to
 *   refuse (before any body is read).
 * Anything else (other content types, an incomplete envelope) is left to
 * connect-es to refuse in its own words.
 */
export function countingMessages(
  body: AsyncIterable<Uint8Array>,
  desc: DescMessage,
  contentType: string,
  encoding = "",
): CountedBody {
  const type = contentType.split(";")[0]!.trim().toLowerCase();
  const json = JSON_TYPES.has(type);
  if (!json && !BINARY_TYPES.has(type)) return { body, inflatesUnary: false };
  const enveloped = !UNARY_TYPES.has(type);
  const decompressor = DECOMPRESSORS.get(encoding.trim().toLowerCase());
  const count = json ? (m: Uint8Array) => jsonElementsAtMost(m) : (m: Uint8Array) => countElements(desc, m);
  const tooLong = (what: string) => new ConnectError(`${what} is longer than the ${MAX_MESSAGE_BYTES}-byte message limit: refused before reading it`, Code.ResourceExhausted);
  /** The message as connect-es should decode it: inflated if it came compressed, refused if over the budget. */
  const counted = async (message: Uint8Array, compressed: boolean): Promise<Uint8Array> => {
    const plain = compressed && decompressor ? await inflate(message) : message;
    if (count(plain) === Infinity) throw new ConnectError(`the ${desc.name} message holds more than ${MAX_MESSAGE_ELEMENTS} elements: refused before decoding`, Code.InvalidArgument);
    return plain;
  };
  const inflate = async (message: Uint8Array): Promise<Uint8Array> => {
    try {
      return await decompressor!.decompress(message, MAX_MESSAGE_BYTES);
    } catch (err) {
      // Past the limit stays RESOURCE_EXHAUSTED (connect-es's answer); a body that does not inflate is the caller's error.
      if (err instanceof ConnectError && err.code === Code.ResourceExhausted) throw err;
      throw new ConnectError(`the ${desc.name} message does not inflate as ${encoding.trim().toLowerCase()}`, Code.InvalidArgument);
    }
  };
  const out = (async function* () {
    const held = new ChunkQueue();
    for await (const chunk of body) {
      held.push(chunk);
      if (!enveloped) {
        if (held.size > MAX_MESSAGE_BYTES) throw tooLong(`the ${desc.name} request body`);
        continue;
      }
      // Every whole envelope held: counted, then passed on (inflated if it came compressed).
      while (held.size >= 5) {
        const flags = held.byteAt(0);
        const length = held.uint32At(1);
        if (length > MAX_MESSAGE_BYTES) throw tooLong(`a ${desc.name} message`);
        if (held.size < 5 + length) break;
        const envelope = held.take(5 + length);
        const compressed = (flags & 1) === 1;
        const message = await counted(envelope.subarray(5), compressed);
        if (!compressed || !decompressor) {
          yield envelope;
          continue;
        }
        const plain = new Uint8Array(5 + message.length);
        plain[0] = flags & ~1;
        new DataView(plain.buffer).setUint32(1, message.length);
        plain.set(message, 5);
        yield plain;
      }
    }
    if (held.size === 0) return;
    const rest = held.take(held.size);
    // An incomplete envelope is left to connect-es to report; a unary body is one message.
    yield enveloped ? rest : await counted(rest, decompressor !== undefined);
  })();
  return { body: out, inflatesUnary: !enveloped && decompressor !== undefined };
}

export interface CountedBody {
  body: AsyncIterable<Uint8Array>;
  /** The unary body comes out inflated: the header naming its encoding must not reach connect-es. */
  inflatesUnary: boolean;
}

/**
 * A connect-es handler whose request body is read only once `gate` has
 * passed; `gate` refuses by throwing. A caller that no request could admit
 * is refused before its body costs anything (common/connect-server.ts).
 */
export function gatingRequests(handler: UniversalHandler, gate: (req: UniversalServerRequest) => Promise<void>): UniversalHandler {
  const wrapped = (req: UniversalServerRequest) => {
    const body = req.body;
    if (typeof body !== "object" || body === null || !(Symbol.asyncIterator in body)) return handler(req);
    return handler({ ...req, body: gatedBody(body as AsyncIterable<Uint8Array>, () => gate(req)) });
  };
  return asHandlerOf(handler, wrapped);
}

/** The body, read only once `gate` has passed. */
export async function* gatedBody(body: AsyncIterable<Uint8Array>, gate: () => Promise<void>): AsyncIterable<Uint8Array> {
  await gate();
  yield* body;
}

/**
 * Bytes received and not yet passed on, as the chunks they came in: peeking
 * at a header reads across chunks without joining them, and taking copies
 * only what spans two chunks (a message inside one is a view of it).
 */
class ChunkQueue {
  private chunks: Uint8Array[] = [];
  /** The first chunk not wholly passed on, and where its unread part begins. */
  private head = 0;
  private offset = 0;
  size = 0;

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  byteAt(i: number): number {
    let at = this.offset + i;
    for (let k = this.head; k < this.chunks.length; k++) {
      const c = this.chunks[k]!;
      if (at < c.length) return c[at]!;
      at -= c.length;
    }
    throw new RangeError("past the bytes held");
  }

  uint32At(i: number): number {
    return ((this.byteAt(i) << 24) | (this.byteAt(i + 1) << 16) | (this.byteAt(i + 2) << 8) | this.byteAt(i + 3)) >>> 0;
  }

  take(n: number): Uint8Array {
    const first = this.chunks[this.head]!;
    if (first.length - this.offset >= n) {
      const view = first.subarray(this.offset, this.offset + n);
      this.advance(n);
      return view;
    }
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[this.head]!;
      const part = Math.min(c.length - this.offset, n - filled);
      out.set(c.subarray(this.offset, this.offset + part), filled);
      filled += part;
      this.advance(part);
    }
    return out;
  }

  private advance(n: number): void {
    this.size -= n;
    this.offset += n;
    if (this.offset < this.chunks[this.head]!.length) return;
    this.offset = 0;
    ({ items: this.chunks, head: this.head } = cutFront(this.chunks, this.head + 1));
  }
}
