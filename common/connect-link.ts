import type { HandlerContext } from "@connectrpc/connect";
import type { PeerIdentity } from "../certs/identity.js";
import { AsyncQueue } from "./async-queue.js";
import { callerOf } from "./connect-server.js";
import { untilClosed, type FrameLink } from "./frame-link.js";
import { toConnectError } from "./rpc-errors.js";

class QueueLink<Out, In> implements FrameLink<Out, In> {
  readonly outgoing = new AsyncQueue<Out>();
  readonly closed: Promise<void>;
  readonly incoming: AsyncIterable<In>;
  private resolveClosed!: () => void;

  constructor(
    incoming: AsyncIterable<In>,
    private readonly onClose: (error?: Error) => void,
    private readonly prepare?: (frame: Out) => Out,
  ) {
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.incoming = untilClosed(incoming, this.closed);
  }

  send(frame: Out): void {
    this.outgoing.push(this.prepare ? this.prepare(frame) : frame);
  }

  get backlog(): number {
    return this.outgoing.size;
  }

  whenWritable(frames: number): Promise<void> {
    return this.outgoing.waitBelow(frames);
  }

  close(error?: Error): void {
    if (this.outgoing.isClosed) return;
    this.outgoing.close(error);
    this.onClose(error);
    this.resolveClosed();
  }
}

/**
 * Serves one bidirectional stream with session logic written against
 * FrameLink. The session's outcome becomes the stream's status: a domain
 * error reaches the peer with its code, anything else as INTERNAL.
 * `prepare`, if given, turns each frame sent into what is encoded (as
 * {@link openFrameLink}'s does).
 */
export async function* serveFrameLink<In, Out>(
  requests: AsyncIterable<In>,
  ctx: HandlerContext,
  serve: (link: FrameLink<Out, In>, peer: PeerIdentity) => Promise<void>,
  prepare?: (frame: Out) => Out,
): AsyncGenerator<Out> {
  const peer = callerOf(ctx);
  const link = new QueueLink<Out, In>(requests, () => {}, prepare);
  const onAbort = () => link.close();
  ctx.signal.addEventListener("abort", onAbort, { once: true });
  serve(link, peer).then(
    () => link.close(),
    (err) => link.close(toConnectError(err)),
  );
  try {
    yield* link.outgoing;
  } finally {
    ctx.signal.removeEventListener("abort", onAbort);
    link.close();
  }
}

/**
 * Opens a bidirectional stream as a FrameLink. `call` starts the RPC with the
 * outgoing frames and returns the incoming ones; closing the link aborts the
 * call and releases its connection through `release`. `prepare`, if given,
 * turns each frame sent into what is encoded (output chunks in their wire
 * form: common/output-wire.ts `outputAsWireFor`); a frame is not changed
 * after it is sent.
 */
export function openFrameLink<Out, In>(
  call: (outgoing: AsyncIterable<Out>, signal: AbortSignal) => AsyncIterable<In>,
  release: (error?: Error) => void,
  prepare?: (frame: Out) => Out,
): FrameLink<Out, In> {
  const abort = new AbortController();
  let link: QueueLink<Out, In>;
  const incoming: AsyncIterable<In> = {
    [Symbol.asyncIterator]: () => {
      const it = call(link.outgoing, abort.signal)[Symbol.asyncIterator]();
      return {
        next: async () => {
          try {
            const r = await it.next();
            if (r.done) link.close();
            return r;
          } catch (err) {
            link.close(err instanceof Error ? err : new Error(String(err)));
            throw err;
          }
        },
        return: async () => {
          link.close();
          return (await it.return?.()) ?? { value: undefined, done: true };
        },
        throw: async (err?: unknown) => {
          link.close(err instanceof Error ? err : new Error(String(err)));
          return (await it.return?.()) ?? { value: undefined, done: true };
        },
      };
    },
  };
  link = new QueueLink<Out, In>(
    incoming,
    (error) => {
      abort.abort(error ?? new Error("link closed"));
      release(error);
    },
    prepare,
  );
  return link;
}
