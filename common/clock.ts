/**
 * Time as a dependency. Logic takes a Clock instead of calling Date.now or
 * setTimeout, so that tests can drive time by hand.
 */
export interface Timer {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  /** Runs fn once after ms; the returned timer does not keep the process alive. */
  setTimeout(fn: () => void, ms: number): Timer;
  /** Resolves after ms, or rejects with the signal's reason when it aborts first. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/**
 * The longest delay Node's setTimeout honours (2^31-1 ms, about 24.8 days);
 * a longer one fires after 1 ms. Longer delays are chained in steps of it.
 */
const MAX_TIMER_MS = 2 ** 31 - 1;

export const systemClock: Clock = {
  now: () => Date.now(),
  setTimeout(fn, ms) {
    let t: NodeJS.Timeout;
    const at = Date.now() + ms;
    const arm = (delay: number) => {
      t = setTimeout(() => {
        const left = at - Date.now();
        if (left > 0) arm(left);
        else fn();
      }, Math.min(Math.max(0, delay), MAX_TIMER_MS));
      t.unref();
    };
    arm(Number.isFinite(ms) ? ms : MAX_TIMER_MS);
    return { cancel: () => clearTimeout(t) };
  },
  sleep: (ms, signal) => sleepWith(systemClock, ms, signal),
};

/**
 * clock.setTimeout, then one turn more: what was already waiting when the
 * time came (a read, a child's exit: events behind a late timer when the
 * process was busy) is handled before fn. For waits whose end concludes
 * that something did not happen.
 */
export function setTimeoutAfterPending(clock: Clock, fn: () => void, ms: number): Timer {
  let next: Timer | undefined;
  const first = clock.setTimeout(() => (next = clock.setTimeout(fn, 0)), ms);
  return {
    cancel: () => {
      first.cancel();
      next?.cancel();
    },
  };
}

function sleepWith(clock: Clock, ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      timer.cancel();
      reject(signal?.reason);
    };
    const timer = clock.setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** A clock that moves only when told to; for tests. */
export class ManualClock implements Clock {
  private current: number;
  private timers: { at: number; fn: () => void; id: number }[] = [];
  private nextId = 0;

  constructor(start = Date.UTC(2026, 0, 1)) {
    this.current = start;
  }

  now(): number {
    return this.current;
  }

  setTimeout(fn: () => void, ms: number): Timer {
    const id = this.nextId++;
    this.timers.push({ at: this.current + Math.max(0, ms), fn, id });
    return { cancel: () => (this.timers = this.timers.filter((t) => t.id !== id)) };
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    return sleepWith(this, ms, signal);
  }

  /** Moves time forward by ms, firing due timers in order. */
  advance(ms: number): void {
    const target = this.current + ms;
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at || a.id - b.id);
      const next = this.timers[0];
      if (!next || next.at > target) break;
      this.timers.shift();
      this.current = next.at;
      next.fn();
    }
    this.current = target;
  }
}
