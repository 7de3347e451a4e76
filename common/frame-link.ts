import type { PeerIdentity } from "../certs/identity.js";

/**
 * One open bidirectional stream, as session logic sees it, whatever RPC
 * library carries it. On the serving side the peer's identity is passed
 * beside the link, taken from its verified TLS certificate, never from a
 * message.
 */
export interface FrameLink<Out, In> {
  /** Frames from the peer, in order; ends when the stream ends, throws when it fails. */
  readonly incoming: AsyncIterable<In>;
  /** Queues a frame for writing, in order. Frames sent after close are dropped. */
  send(frame: Out): void;
  /** Frames queued but not yet written; for back-pressure decisions. */
  readonly backlog: number;
  /** Resolves once fewer than `frames` frames wait to be written (or the link has closed). */
  whenWritable(frames: number): Promise<void>;
  /** Ends the stream: gracefully without an error, as a failure with one. */
  close(error?: Error): void;
  /** Resolves when the stream has ended, whichever side ended it. */
  readonly closed: Promise<void>;
  /** On the dialling side: the identity in the server's certificate, once the handshake is done. */
  readonly peer?: PeerIdentity;
  /** On the serving side, where the transport tells: the connection the stream arrived on. */
  readonly connection?: LinkConnection;
}

/**
 * The connection under a served stream: what a server needs to watch a
 * peer that pings it (common/silence-watch.ts) and to drop it.
 */
export interface LinkConnection {
  /** Bytes received on the connection so far, its peer's PINGs included. */
  readonly bytesRead: number;
  /** Drops the connection and every stream on it. */
  destroy(): void;
}

/**
 * Ends an iteration when `closed` resolves, even if the source never yields
 * again: a link declared dead (heartbeat lost over a silent connection) must
 * release its session at once, not when TCP finally gives up.
 */
export function untilClosed<T>(source: AsyncIterable<T>, closed: Promise<void>): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = source[Symbol.asyncIterator]();
      let ended = false;
      let pending: { resolve: (r: IteratorResult<T>) => void; reject: (e: unknown) => void } | undefined;
      // One reaction on `closed` for the whole iteration. (Racing every next() against `closed`
      // left a reaction per frame on that long-lived promise, each holding its frame: a link kept
      // every frame it ever received until it closed.)
      const end = () => {
        ended = true;
        const p = pending;
        pending = undefined;
        p?.resolve({ done: true, value: undefined });
      };
      closed.then(end, end);
      return {
        next: () => {
          if (ended) return Promise.resolve({ done: true, value: undefined });
          return new Promise<IteratorResult<T>>((resolve, reject) => {
            const me = { resolve, reject };
            pending = me;
            it.next().then(
              (r) => {
                if (pending !== me) return; // the link closed first
                pending = undefined;
                resolve(r);
              },
              (err: unknown) => {
                if (pending !== me) return;
                pending = undefined;
                reject(err);
              },
            );
          });
        },
        return: async () => {
          ended = true;
          pending = undefined;
          it.return?.()?.catch(() => undefined);
          return { done: true, value: undefined };
        },
      };
    },
  };
}
