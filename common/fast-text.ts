import { configureTextEncoding, getTextEncoding } from "@bufbuild/protobuf/wire";

/** Strings up to this length take the ASCII loop when encoded; longer ones the native codec. */
const SHORT = 64;

/**
 * Installs a faster UTF-8 encoder for protobuf-es: most strings in rexmesh
 * frames are short ASCII ids (task, job, host, proxy names), and for those a
 * plain loop beats a native TextEncoder call about 6 to 1 (the call's own
 * cost dominates: 88–100 against 581–691 ns for a 26-character id, Node 20
 * here). Anything non-ASCII or long goes to the built-in codec, so the bytes
 * are always exactly the same. Encoding a 1,000-task WatchJob batch:
 * 11.5 ms → 4.0 ms.
 *
 * Decoding stays native. A loop that appends one character at a time builds
 * a chain of partial strings (about 1 KB of garbage per id) that the first
 * Map lookup then flattens: 284–296 ns per id decoded, 470–574 with a lookup,
 * against the built-in decoder's 76–121 and 157–159; the controller decoded
 * every task id of its proxies' status runs that way (17 MiB of its sampled
 * allocations over six 4,000-host pings).
 */
export function installFastText(): void {
  const base = getTextEncoding();
  configureTextEncoding({
    checkUtf8: base.checkUtf8,
    encodeUtf8(text: string): Uint8Array<ArrayBuffer> {
      const n = text.length;
      if (n > SHORT) return base.encodeUtf8(text);
      const out = new Uint8Array(n);
      for (let i = 0; i < n; i++) {
        const c = text.charCodeAt(i);
        if (c > 0x7f) return base.encodeUtf8(text);
        out[i] = c;
      }
      return out;
    },
    decodeUtf8: base.decodeUtf8,
  });
}
