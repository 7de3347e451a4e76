/**
 * Syntax rules for where `file.put` may write, shared by the controller
 * (which refuses a bad path at submit) and the daemon (which checks again
 * and also resolves symlinks, see daemon/file-put.ts).
 */
import { isAbsolute } from "node:path";

/** Syntax rules, checked at submit by the controller and again here. Returns why the path is refused, or undefined. */
export function relativePathProblem(path: string): string | undefined {
  if (path === "") return "the path is empty";
  if (path.includes("\0")) return "the path contains a NUL byte";
  if (isAbsolute(path) || path.startsWith("/")) return `the path ${JSON.stringify(path)} is absolute; it must be relative to base_dir`;
  const parts = path.split("/");
  if (parts.includes("..")) return `the path ${JSON.stringify(path)} has a ".." segment`;
  if (parts.every((p) => p === "" || p === ".")) return `the path ${JSON.stringify(path)} names no file`;
  if (parts.at(-1) === "" || parts.at(-1) === ".") return `the path ${JSON.stringify(path)} names a directory, not a file`;
  return undefined;
}

/** Returns why a base directory is refused, or undefined. */
export function baseDirProblem(baseDir: string): string | undefined {
  if (baseDir === "") return "base_dir is empty";
  if (baseDir.includes("\0")) return "base_dir contains a NUL byte";
  if (!isAbsolute(baseDir)) return `base_dir ${JSON.stringify(baseDir)} is not absolute`;
  return undefined;
}

