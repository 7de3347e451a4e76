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
  /** Ends the stream: gracefully without an error, as a failure with one. */
  close(error?: Error): void;
  /** Resolves when the stream has ended, whichever side ended it. */
  readonly closed: Promise<void>;
}
