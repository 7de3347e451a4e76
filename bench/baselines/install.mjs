// Installs (or detects) what the baselines need: Debian packages through
// apt-get (only when running as root; `apt-get update` once per run) and npm
// packages into bench/.deps (never the project's package.json or lockfile).
// Nothing here throws for a missing tool: every helper answers
// { ok: true, ... } or { ok: false, skipped: "why" }.
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const here = new URL(".", import.meta.url).pathname;
/** Where npm packages for the baselines go (git-ignored). */
export const DEPS_DIR = join(here, "..", ".deps");

const log = (msg) => process.stderr.write(`  [baselines] ${msg}\n`);

/** Runs a command; resolves { code, stdout, stderr } (never rejects). */
export function run(cmd, args, { timeoutMs = 600_000, env, cwd, input } = {}) {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 64 * 2 ** 20, env: env ?? process.env, cwd, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === "number" ? err.code : -1) : 0, error: err ? String(err.message ?? err) : undefined, stdout: String(stdout ?? ""), stderr: String(stderr ?? "") });
    });
    if (input !== undefined) child.stdin.end(input);
  });
}

/** The full path of a binary on PATH (plus the sbin directories), or undefined. */
export function which(bin) {
  if (bin.includes("/")) return existsSync(bin) ? bin : undefined;
  const dirs = [...(process.env.PATH ?? "").split(":"), "/usr/sbin", "/sbin", "/usr/local/sbin"];
  for (const d of dirs) {
    if (!d) continue;
    const p = join(d, bin);
    if (existsSync(p)) return p;
  }
  return undefined;
}

const isRoot = () => typeof process.getuid === "function" && process.getuid() === 0;

let aptUpdated; // a promise: apt-get update runs at most once per process
const aptFailed = new Map(); // package → reason, so a failed install is not retried in the same run

function aptUpdate() {
  aptUpdated ??= (async () => {
    log("apt-get update");
    const r = await run("apt-get", ["update"], { timeoutMs: 300_000, env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } });
    if (r.code !== 0) return `apt-get update failed: ${(r.stderr || r.error || "").trim().split("\n").slice(-2).join(" ")}`;
    return undefined;
  })();
  return aptUpdated;
}

/**
 * Makes sure every binary in `bins` exists, installing the Debian packages
 * `pkgs` when one is missing (root only). Answers { ok, paths, installed } or
 * { ok: false, skipped }.
 */
export async function ensureBinaries(bins, pkgs) {
  const find = () => Object.fromEntries(bins.map((b) => [b, which(b)]));
  let paths = find();
  let missing = bins.filter((b) => !paths[b]);
  if (!missing.length) return { ok: true, paths, installed: false };
  const key = pkgs.join(" ");
  if (aptFailed.has(key)) return { ok: false, skipped: aptFailed.get(key) };
  if (!isRoot()) return { ok: false, skipped: `${missing.join(", ")} not installed and not running as root (apt-get install ${key})` };
  if (!which("apt-get")) return { ok: false, skipped: `${missing.join(", ")} not installed and no apt-get on this machine` };
  const upd = await aptUpdate();
  log(`apt-get install -y ${key}`);
  const r = await run("apt-get", ["install", "-y", "--no-install-recommends", ...pkgs], { timeoutMs: 600_000, env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" } });
  paths = find();
  missing = bins.filter((b) => !paths[b]);
  if (r.code !== 0 || missing.length) {
    const why = `apt-get install ${key} failed${upd ? ` (${upd})` : ""}: ${(r.stderr || r.error || "").trim().split("\n").slice(-2).join(" ")}${missing.length ? `; still missing ${missing.join(", ")}` : ""}`;
    aptFailed.set(key, why);
    return { ok: false, skipped: why };
  }
  return { ok: true, paths, installed: true };
}

/** One binary from one package: ensureBinaries([bin], [pkg]). */
export const ensureBinary = (bin, pkg = bin) => ensureBinaries([bin], [pkg]);

const npmInstalls = new Map();

/**
 * Resolves an npm package from bench/.deps, installing it there on demand
 * (`npm install --no-save --no-package-lock --prefix bench/.deps`). Answers
 * { ok, url, dir, version } (url: a file URL to import()) or { ok: false, skipped }.
 */
export function ensureNpm(pkg) {
  if (!npmInstalls.has(pkg)) npmInstalls.set(pkg, ensureNpmOnce(pkg));
  return npmInstalls.get(pkg);
}

// bench/.deps has no package.json: an install there with --no-save keeps only
// the package named (npm prunes what no manifest lists), which is fine while
// the baselines need one npm package (nats).
async function ensureNpmOnce(pkg) {
  const req = createRequire(join(DEPS_DIR, "package.json"));
  const resolveIt = () => {
    try {
      const dir = join(DEPS_DIR, "node_modules", pkg);
      if (!existsSync(join(dir, "package.json"))) return undefined;
      const main = req.resolve(pkg);
      const version = req(join(dir, "package.json")).version;
      return { ok: true, url: pathToFileURL(main).href, dir, version };
    } catch {
      return undefined;
    }
  };
  const have = resolveIt();
  if (have) return have;
  if (!which("npm")) return { ok: false, skipped: `npm package ${pkg} not installed and no npm on PATH` };
  log(`npm install --prefix bench/.deps ${pkg}`);
  const r = await run("npm", ["install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund", "--prefix", DEPS_DIR, pkg], { timeoutMs: 300_000 });
  const got = resolveIt();
  if (r.code !== 0 || !got) return { ok: false, skipped: `npm install ${pkg} failed: ${(r.stderr || r.error || "").trim().split("\n").slice(-2).join(" ")}` };
  return got;
}
