/**
 * Regular expressions written by users (document parameter patterns), run by
 * RE2 through the `re2` package: matching time grows linearly with the input
 * whatever the pattern, so `(a|a)+` cannot stall the controller as it did in
 * V8's backtracking engine (over a minute for 30 characters). What only a
 * backtracking engine can do — backreferences, lookahead, lookbehind — is
 * refused when the pattern is compiled, with a message that says so.
 *
 * The native module is loaded on first use, so a process that never compiles
 * a pattern (the CLI, a daemon) never loads it; if it cannot be loaded,
 * patterns are refused (FAILED_PRECONDITION) rather than run unsafely.
 */
import { createRequire } from "node:module";
import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";

/** A compiled pattern that must match a whole value. */
export interface WholeMatch {
  readonly source: string;
  test(value: string): boolean;
}

type Re2Constructor = new (source: string, flags?: string) => { test(value: string): boolean };

let engine: Re2Constructor | Error | undefined;

function re2(): Re2Constructor {
  if (engine === undefined) {
    try {
      engine = createRequire(import.meta.url)("re2") as Re2Constructor;
    } catch (err) {
      engine = err instanceof Error ? err : new Error(String(err));
    }
  }
  if (engine instanceof Error) {
    throw new FailedPreconditionError("patterns cannot be checked on this controller: the re2 module (linear-time regular expressions) is not installed", { cause: engine });
  }
  return engine;
}

/**
 * Compiles `source` (JavaScript syntax, Unicode mode) anchored to the whole
 * value. Refuses, with InvalidArgumentError starting with `what`: a pattern
 * longer than {@link LIMITS.patternChars}, one that is not valid on its own
 * (so that `a)|(b` cannot escape the anchoring group), and one that needs
 * backtracking.
 */
export function compileWholeMatch(source: string, what: string): WholeMatch {
  if (typeof source !== "string") throw new InvalidArgumentError(`${what}: pattern must be text`);
  if (source.length > LIMITS.patternChars) throw new InvalidArgumentError(`${what}: pattern is longer than ${LIMITS.patternChars} characters`);
  try {
    // Syntax only: V8 parses without matching anything.
    new RegExp(source, "u");
  } catch (cause) {
    throw new InvalidArgumentError(`${what}: pattern is not a valid regular expression (${(cause as Error).message})`, { cause });
  }
  const Engine = re2();
  let re: { test(value: string): boolean };
  try {
    re = new Engine(`^(?:${source})$`, "u");
  } catch (cause) {
    throw new InvalidArgumentError(
      `${what}: pattern cannot run in linear time (backreferences, lookahead and lookbehind are not supported) or is too large: ${(cause as Error).message}`,
      { cause },
    );
  }
  return { source, test: (value) => re.test(value) };
}
