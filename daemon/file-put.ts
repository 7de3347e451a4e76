/**
 * `file.put`: writes content to base_dir/path and nowhere else. The path is
 * relative without ".." segments; the parent directory is resolved with
 * realpath and must stay inside the real base_dir, so a symlink cannot lead
 * out; the content goes to a temporary file opened with O_EXCL|O_NOFOLLOW in
 * that same directory and is renamed over the target (rename replaces a
 * symlink at the target rather than following it).
 *
 * Remaining race: a directory on the path swapped for a symlink between the
 * realpath check and the open. Closing it needs openat2(RESOLVE_BENEATH),
 * which Node does not offer.
 */
import { constants, createReadStream } from "node:fs";
import { lstat, open, realpath, rename, rm } from "node:fs/promises";
import { randomUUID } from "node:crypto";
import { basename, dirname, join, sep } from "node:path";
import { RexmeshError } from "../common/errors.js";
import { baseDirProblem, relativePathProblem } from "../common/put-path.js";

export { baseDirProblem, relativePathProblem };

/** The target path is not allowed (outside base_dir, malformed). */
export class PathRefusedError extends RexmeshError {}

/**
 * The real directory the file will be written in and the file's name, or
 * PathRefusedError when the target would be outside base_dir.
 */
export async function resolveTarget(baseDir: string, relPath: string): Promise<{ dir: string; name: string; target: string }> {
  const problem = baseDirProblem(baseDir) ?? relativePathProblem(relPath);
  if (problem) throw new PathRefusedError(problem);
  let realBase: string;
  try {
    realBase = await realpath(baseDir);
  } catch (err) {
    throw new PathRefusedError(`base_dir ${baseDir} is not usable: ${(err as { code?: string }).code ?? String(err)}`);
  }
  const wanted = join(realBase, relPath);
  let realParent: string;
  try {
    realParent = await realpath(dirname(wanted));
  } catch (err) {
    throw new PathRefusedError(`the directory of ${relPath} does not exist in ${baseDir} (${(err as { code?: string }).code ?? String(err)})`);
  }
  if (realParent !== realBase && !realParent.startsWith(realBase.endsWith(sep) ? realBase : realBase + sep)) {
    throw new PathRefusedError(`the path ${JSON.stringify(relPath)} leads outside ${baseDir} (through a symlink, to ${realParent})`);
  }
  const name = basename(wanted);
  const target = join(realParent, name);
  const existing = await lstat(target).catch(() => undefined);
  if (existing?.isDirectory()) throw new PathRefusedError(`${relPath} is a directory in ${baseDir}`);
  return { dir: realParent, name, target };
}

/** Copies `source` to base_dir/relPath with `mode`, never outside base_dir. Resolves to the final path. */
export async function putFile(source: string, baseDir: string, relPath: string, mode: number): Promise<string> {
  const { dir, target } = await resolveTarget(baseDir, relPath);
  const tmp = join(dir, `.rexmesh-put-${randomUUID()}`);
  const out = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  let renamed = false;
  try {
    try {
      // Written through the descriptor opened above: nothing is reopened by name.
      for await (const chunk of createReadStream(source)) await out.write(chunk as Buffer);
      await out.chmod(mode);
      await out.sync();
    } finally {
      await out.close();
    }
    await rename(tmp, target);
    renamed = true;
    return target;
  } finally {
    if (!renamed) await rm(tmp, { force: true });
  }
}
