import { readFileSync, statSync } from "node:fs";
import { InvalidArgumentError } from "../common/errors.js";

/** What went wrong with a file, in words ("no such file"), for a one-line error. */
function why(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  switch (e.code) {
    case "ENOENT":
      return "no such file";
    case "EACCES":
    case "EPERM":
      return "permission denied";
    case "EISDIR":
      return "is a directory";
    case "ENOTDIR":
      return "a part of the path is not a directory";
    default:
      return e.message ?? String(err);
  }
}

/**
 * A file named on the command line (`--stdin FILE`, `bundle import FILE`),
 * read whole. A file that cannot be read is a usage error naming the option
 * and the reason, not a stack trace.
 */
export function readInputFile(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new InvalidArgumentError(`${what} ${path}: ${why(err)}`, { cause: err });
  }
}

/** Checks that a file named on the command line is a regular file, the same way. */
export function requireRegularFile(path: string, what: string): void {
  let file: boolean;
  try {
    file = statSync(path).isFile();
  } catch (err) {
    throw new InvalidArgumentError(`${what} ${path}: ${why(err)}`, { cause: err });
  }
  if (!file) throw new InvalidArgumentError(`${what} ${path}: not a regular file`);
}
