/**
 * Gathers items into one frame and sends it once per turn of the event loop,
 * so that a burst of statuses, output chunks or acks costs one stream write
 * instead of one per item.
 */
export class Coalescer<F> {
  private current: F | undefined;
  private scheduled = false;

  constructor(
    private readonly create: () => F,
    private readonly send: (frame: F) => void,
    private readonly schedule: (fn: () => void) => void = setImmediate,
  ) {}

  /** The frame being filled; adding to it makes sure it is sent soon. */
  get frame(): F {
    if (this.current === undefined) this.current = this.create();
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
    if (frame !== undefined) this.send(frame);
  }

  /** Drops what is gathered (the stream it was meant for is gone). */
  discard(): void {
    this.current = undefined;
  }
}
