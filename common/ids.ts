import { randomBytes } from "node:crypto";
import type { Clock } from "./clock.js";

/** Produces unique ids; injected so tests can make them predictable. */
export type IdGenerator = (prefix: string) => string;

const ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz";

function encodeTime(ms: number): string {
  let out = "";
  let n = ms;
  for (let i = 0; i < 10; i++) {
    out = ALPHABET[n % 32]! + out;
    n = Math.floor(n / 32);
  }
  return out;
}

/** Random bytes drawn this many at a time: one call into OpenSSL per 512 ids, not one per id. */
const POOL_BYTES = 4096;

/**
 * Ids that sort by creation time (like ULIDs), so that LMDB keys of jobs and
 * tasks are stored in submission order and queues read oldest first.
 *
 * A fleet-wide job takes one id per host: the random part comes from a pool
 * refilled 4 KiB at a time, and the time part is encoded once per
 * millisecond (a fresh `randomBytes(8)` and array per id had been about a
 * tenth of the controller's submit).
 */
export function timeOrderedIds(clock: Clock, random: (n: number) => Uint8Array = randomBytes): IdGenerator {
  let last = -1;
  let time = "";
  let counter = 0;
  let pool: Uint8Array = new Uint8Array(0);
  let at = 0;
  return (prefix) => {
    const now = clock.now();
    if (now === last) counter++;
    else {
      last = now;
      time = encodeTime(now);
      counter = 0;
    }
    if (at + 8 > pool.length) {
      pool = random(POOL_BYTES);
      at = 0;
    }
    let rnd = "";
    for (let i = 0; i < 8; i++) rnd += ALPHABET[pool[at + i]! % 32];
    at += 8;
    return `${prefix}${time}${counter.toString(32).padStart(3, "0")}${rnd}`;
  };
}
