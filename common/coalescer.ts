/** Largest frame a sender builds; the RPC message limit leaves room above it (see MAX_MESSAGE_BYTES). */
export const MAX_FRAME_BYTES = 4 * 1024 * 1024;
/** Message limit of every rexmesh server and client: a frame plus one oversized item (a task spec with 1 MiB stdin). */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

/**
 * Gathers items into one frame and sends it once per turn of the event loop,
 * so that a burst of statuses, output chunks or acks costs one stream write
 * instead of one per item. A frame never grows past maxBytes: an item that
 * would overflow it goes into the next frame, sent right after.
 */
export class Coalescer<F> {
  private current: F | undefined;
  private currentBytes = 0;
  private scheduled = false;

  constructor(
    private readonly create: () => F,
    private readonly send: (frame: F) => void,
    private readonly schedule: (fn: () => void) => void = setImmediate,
    private readonly maxBytes = MAX_FRAME_BYTES,
  ) {}

  /** The frame being filled, for small items (acks, credits, statuses). */
  get frame(): F {
    return this.frameFor(64);
  }

  /** The frame to add an item of about `bytes` to; sends the current one first if the item would overflow it. */
  frameFor(bytes: number): F {
    if (this.current !== undefined && this.currentBytes > 0 && this.currentBytes + bytes > this.maxBytes) this.flush();
    if (this.current === undefined) {
      this.current = this.create();
      this.currentBytes = 0;
    }
    this.currentBytes += bytes;
    if (!this.scheduled) {
      this.scheduled = true;
      this.schedule(() => this.flush());
    }
    return this.current;
  }

  /** Sends what is gathered now. */
  flush(): void {
    this.scheduled = false;
    const frame = this.current;
    this.current = undefined;
    this.currentBytes = 0;
    if (frame !== undefined) this.send(frame);
  }

  /** Drops what is gathered (the stream it was meant for is gone). */
  discard(): void {
    this.current = undefined;
    this.currentBytes = 0;
  }
}
