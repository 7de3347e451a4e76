/**
 * One writer at a time: the scheduler's handling of a schedule and an
 * operator's change to it (controller/schedules.ts), or an event's
 * evaluation and an operator's change to a trigger (controller/triggers.ts).
 * Each turn reads its records fresh inside, so none writes back a copy
 * another changed meanwhile.
 */
export class Turns {
  private chain: Promise<unknown> = Promise.resolve();

  /** Runs `fn` after every turn taken before it has ended (whether it failed or not). */
  take<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }
}
