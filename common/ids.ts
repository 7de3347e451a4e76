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

/**
 * Ids that sort by creation time (like ULIDs), so that LMDB keys of jobs and
 * tasks are stored in submission order and queues read oldest first.
 */
export function timeOrderedIds(clock: Clock, random: (n: number) => Uint8Array = randomBytes): IdGenerator {
  let last = "";
  let counter = 0;
  return (prefix) => {
    const time = encodeTime(clock.now());
    counter = time === last ? counter + 1 : 0;
    last = time;
    const rnd = Array.from(random(8), (b) => ALPHABET[b % 32]).join("");
    return `${prefix}${time}${counter.toString(32).padStart(3, "0")}${rnd}`;
  };
}
