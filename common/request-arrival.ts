/**
 * connect-es reads the whole request of a unary (or server-streaming) call
 * before the handler context's deadline means anything to it: a caller
 * that sends part of a frame and never ends its request holds the call,
 * and whatever it buffered, for as long as its connection lasts.
 * {@link boundRequestArrival} wraps such a method's handler to give the
 * request body a deadline: the caller's own (grpc-timeout,
 * connect-timeout-ms), and never more than `maxMs`. When it passes,
 * reading the body fails with DEADLINE_EXCEEDED, which connect-es answers
 * in the caller's protocol. {@link failingOnAbort} does the same for a
 * client stream at its call's deadline.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";
import { parseTimeout as parseConnectTimeout } from "@connectrpc/connect/protocol-connect";
import { parseTimeout as parseGrpcTimeout } from "@connectrpc/connect/protocol-grpc";
import type { Clock, Timer } from "./clock.js";
import { asHandlerOf } from "./undecodable-request.js";

/** True for the methods whose request is one message, read whole before the handler runs. */
function readsWholeRequest(handler: Pick<UniversalHandler, "method">): boolean {
  return handler.method.methodKind === "unary" || handler.method.methodKind === "server_streaming";
}

/** Returns streaming-request methods' handlers as they are; bounds the others'. */
export function boundRequestArrival(handler: UniversalHandler, opts: { maxMs: number; clock: Clock }): UniversalHandler {
  if (!readsWholeRequest(handler)) return handler;
  const wrapped = (req: UniversalServerRequest) => {
    const body = req.body;
    if (!isAsyncIterable(body)) return handler(req);
    const asked = askedTimeoutMs(req.header);
    const own = asked !== undefined && asked < opts.maxMs;
    const ms = own ? asked : opts.maxMs;
    const err = own
      ? new ConnectError(`the request had not arrived by its deadline (${ms} ms)`, Code.DeadlineExceeded)
      : new ConnectError(`the request had not arrived within ${opts.maxMs / 1000} s`, Code.DeadlineExceeded);
    return handler({ ...req, body: arrivingWithin(body, ms, err, opts.clock) });
  };
  return asHandlerOf(handler, wrapped);
}

/**
 * The deadline the caller asked for, if any and if valid. A header that
 * does not parse is left to connect-es, which refuses it.
 */
function askedTimeoutMs(header: Headers): number | undefined {
  const grpc = header.get("grpc-timeout");
  if (grpc !== null) return parseGrpcTimeout(grpc, Number.MAX_SAFE_INTEGER).timeoutMs;
  const connect = header.get("connect-timeout-ms");
  if (connect !== null) return parseConnectTimeout(connect, Number.MAX_SAFE_INTEGER).timeoutMs;
  return undefined;
}

function isAsyncIterable(x: unknown): x is AsyncIterable<Uint8Array> {
  return typeof x === "object" && x !== null && Symbol.asyncIterator in x;
}

/** `body`, failing with `err` once `ms` pass before it ends; counted from the call's start. */
function arrivingWithin(body: AsyncIterable<Uint8Array>, ms: number, err: ConnectError, clock: Clock): AsyncIterable<Uint8Array> {
  const deadline = new AbortController();
  const timer: Timer = clock.setTimeout(() => deadline.abort(err), ms);
  return failingOnAbort(body, deadline.signal, () => timer.cancel());
}

/**
 * `source`, whose read in flight fails with the signal's reason once it
 * aborts, and every read after: a request stream stops at the call's
 * deadline even while the caller holds a message half sent. `onEnd` runs
 * once the reads are over (the source ended or failed, or was returned).
 * Only the read in flight waits on the signal: no reaction per message on
 * a long-lived promise, which would keep every message until the end.
 */
export function failingOnAbort<T>(source: AsyncIterable<T>, signal: AbortSignal, onEnd: () => void = () => {}): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = source[Symbol.asyncIterator]();
      let failPending: ((e: unknown) => void) | undefined;
      const onAbort = () => {
        const fail = failPending;
        failPending = undefined;
        fail?.(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      let ended = false;
      const end = () => {
        if (ended) return;
        ended = true;
        signal.removeEventListener("abort", onAbort);
        onEnd();
      };
      return {
        next: () => {
          if (signal.aborted) return Promise.reject(signal.reason);
          return new Promise<IteratorResult<T>>((resolve, reject) => {
            failPending = reject;
            it.next().then(
              (r) => {
                if (failPending !== reject) return; // the signal came first
                failPending = undefined;
                if (r.done) end();
                resolve(r);
              },
              (e: unknown) => {
                if (failPending !== reject) return;
                failPending = undefined;
                end();
                reject(e);
              },
            );
          });
        },
        return: () => {
          end();
          failPending = undefined;
          // The read in flight is not waited for: the caller may never send another byte.
          it.return?.()?.catch(() => undefined);
          return Promise.resolve({ done: true, value: undefined });
        },
      };
    },
  };
}
