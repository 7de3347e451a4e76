/**
 * A single-consumer queue that is also an async iterable: producers push
 * without waiting, the consumer awaits. Used to feed stream writers.
 */
export class AsyncQueue<T> implements AsyncIterable<T> {
  private items: T[] = [];
  private head = 0;
  private waiter: ((r: IteratorResult<T>) => void) | undefined;
  private failWaiter: ((e: unknown) => void) | undefined;
  private closed = false;
  private error: unknown;
  private readonly shrinkWaiters: { below: number; resolve: () => void }[] = [];

  /** Resolves once fewer than `below` items wait (at once if that is already so, or when closed). */
  waitBelow(below: number): Promise<void> {
    if (this.size < below || this.closed) return Promise.resolve();
    return new Promise((resolve) => this.shrinkWaiters.push({ below, resolve }));
  }

  private shrunk(): void {
    if (this.shrinkWaiters.length === 0) return;
    for (let i = this.shrinkWaiters.length - 1; i >= 0; i--) {
      const w = this.shrinkWaiters[i]!;
      if (this.size < w.below || this.closed) {
        this.shrinkWaiters.splice(i, 1);
        w.resolve();
      }
    }
  }

  get size(): number {
    return this.items.length - this.head;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  push(item: T): void {
    if (this.closed) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = this.failWaiter = undefined;
      w({ value: item, done: false });
      return;
    }
    this.items.push(item);
  }

  /** Ends the iteration after the items already pushed; with an error, ends it at once. */
  close(error?: unknown): void {
    if (this.closed) return;
    this.closed = true;
    this.shrunk();
    this.error = error;
    if (error !== undefined) {
      this.items = [];
      this.head = 0;
    }
    if (this.waiter) {
      const w = this.waiter;
      const f = this.failWaiter;
      this.waiter = this.failWaiter = undefined;
      if (error !== undefined) f?.(error);
      else w({ value: undefined as never, done: true });
    }
  }

  next(): Promise<IteratorResult<T>> {
    if (this.head < this.items.length) {
      const value = this.items[this.head]!;
      // Drop the reference: a frame written must not stay alive until the array is compacted.
      this.items[this.head++] = undefined as T;
      if (this.head > 1024 && this.head * 2 > this.items.length) {
        this.items = this.items.slice(this.head);
        this.head = 0;
      }
      this.shrunk();
      return Promise.resolve({ value, done: false });
    }
    if (this.closed) {
      return this.error !== undefined ? Promise.reject(this.error) : Promise.resolve({ value: undefined as never, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiter = resolve;
      this.failWaiter = reject;
    });
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: () => this.next(),
      return: async () => {
        this.close();
        return { value: undefined as never, done: true };
      },
      throw: async (err?: unknown) => {
        this.close(err ?? new Error("queue aborted"));
        return { value: undefined as never, done: true };
      },
    };
  }
}
