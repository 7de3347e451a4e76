import { Backoff, type BackoffOptions } from "./backoff.js";
import type { Clock } from "./clock.js";
import type { Logger } from "./logger.js";

export interface ReconnectOptions<L> {
  /** Addresses to try in order; after a connection that failed early, the next one (failover). */
  targets: readonly string[];
  /** Opens a link (it may fail later, in serve, when the connection cannot be made). */
  dial: (target: string, signal: AbortSignal) => Promise<L>;
  /**
   * Serves a link until it ends. Calls `up` once the peer has answered (its
   * welcome arrived): only then is the link reported up.
   */
  serve: (link: L, target: string, up: (peerName?: string) => void) => Promise<void>;
  /** Closes a link that serve left open (abort, failure). */
  close: (link: L) => void;
  clock: Clock;
  log: Logger;
  /** Stops the loop; the link in use is closed. */
  signal: AbortSignal;
  /** What the link is called in logs ("controller link", "proxy link"). */
  what: string;
  backoff?: BackoffOptions;
  /** A link that stayed up this long resets the backoff and is dialled again first. Default 10 s. */
  healthyAfterMs?: number;
  /** Counts attempts (metrics). */
  onAttempt?: () => void;
  /** Random source of the backoff's jitter. */
  random?: () => number;
}

/**
 * The one reconnect loop of the roles that dial out (the daemon to its
 * proxies, the proxy to the controller): dial, serve until the link ends,
 * back off with capped exponential delays and jitter, and move on to the
 * next address when a link failed before it was healthy. The backoff starts
 * over after a link that stayed up long enough. Every outcome is logged:
 * a link up once its peer answered, down when it ended, and each failure to
 * reach a peer (at warn the first time in an outage, then at debug).
 */
export async function reconnectLoop<L>(opts: ReconnectOptions<L>): Promise<void> {
  const backoff = new Backoff(opts.backoff, opts.random);
  const healthyAfterMs = opts.healthyAfterMs ?? 10_000;
  const { clock, log, signal, what } = opts;
  let index = 0;
  let failures = 0;
  while (!signal.aborted) {
    const target = opts.targets[index % opts.targets.length]!;
    const startedAt = clock.now();
    let upAt: number | undefined;
    let link: L | undefined;
    const onAbort = () => link !== undefined && opts.close(link);
    signal.addEventListener("abort", onAbort, { once: true });
    opts.onAttempt?.();
    let error: unknown;
    try {
      link = await opts.dial(target, signal);
      await opts.serve(link, target, (peerName) => {
        upAt = clock.now();
        failures = 0;
        log.info(`${what} up`, { address: target, ...(peerName ? { peer: peerName } : {}) });
      });
    } catch (err) {
      error = err;
    } finally {
      signal.removeEventListener("abort", onAbort);
      if (link !== undefined) opts.close(link);
    }
    if (signal.aborted) break;
    if (upAt !== undefined) {
      log.warn(`${what} down`, { address: target, after: `${Math.round((clock.now() - upAt) / 1000)}s`, ...(error ? { err: error } : {}) });
    } else {
      failures++;
      const level = failures === 1 ? "warn" : "debug";
      log[level](`cannot reach ${what.replace(/ link$/, "")}`, { address: target, attempt: failures, ...(error ? { err: error } : { err: "the stream ended before the peer answered" }) });
    }
    if (upAt !== undefined && clock.now() - startedAt > healthyAfterMs) backoff.reset();
    else index++;
    try {
      await clock.sleep(backoff.next(), signal);
    } catch {
      break;
    }
  }
}
