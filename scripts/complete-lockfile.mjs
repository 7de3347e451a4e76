// Completes package-lock.json with the platform-specific optional packages
// (other operating systems' and CPUs' binaries) that this workplace's npm
// registry mirror does not serve at the locked version. Without the entries
// `npm ci` refuses the lockfile as "out of sync", even though it would skip
// those packages on this platform anyway. Each entry gets the os/cpu/libc of
// the nearest version the mirror does serve, so npm knows to skip it here.
// Run after `npm install` whenever dependencies change.
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";

const lockPath = new URL("../package-lock.json", import.meta.url);
const lock = JSON.parse(readFileSync(lockPath, "utf8"));
const packages = lock.packages;

function npmView(args) {
  try {
    return JSON.parse(execFileSync("npm", ["view", ...args, "--json"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }) || "null");
  } catch {
    return null;
  }
}

function cmp(a, b) {
  const pa = a.split(/[.-]/).map(Number);
  const pb = b.split(/[.-]/).map(Number);
  for (let i = 0; i < 3; i++) if ((pa[i] ?? 0) !== (pb[i] ?? 0)) return (pa[i] ?? 0) - (pb[i] ?? 0);
  return 0;
}

let added = 0;
for (const [path, entry] of Object.entries(packages)) {
  for (const [name, spec] of Object.entries(entry.optionalDependencies ?? {})) {
    const where = `${path ? path + "/" : ""}node_modules/${name}`;
    if (packages[where] || packages[`node_modules/${name}`]) continue;
    const version = spec.replace(/^[\^~=]/, "");
    const versions = [].concat(npmView([name, "versions"]) ?? []);
    const near = versions.filter((v) => !v.includes("-") && cmp(v, version) <= 0).sort(cmp).pop() ?? versions.sort(cmp).pop();
    if (!near) {
      console.error(`skip ${name}: the registry knows no version of it`);
      continue;
    }
    const meta = npmView([`${name}@${near}`, "os", "cpu", "libc", "license"]) ?? {};
    if (!meta.os && !meta.cpu) {
      console.error(`skip ${name}: ${near} names no os or cpu, so it is not a platform binary`);
      continue;
    }
    const out = { version, optional: true };
    if (entry.dev) out.dev = true;
    if (meta.license) out.license = meta.license;
    for (const k of ["cpu", "os", "libc"]) if (meta[k]) out[k] = [].concat(meta[k]);
    packages[`node_modules/${name}`] = out;
    added++;
    console.log(`added ${name}@${version} (${[].concat(meta.os ?? []).join(",")} ${[].concat(meta.cpu ?? []).join(",")}) from ${near}`);
  }
}
lock.packages = Object.fromEntries(Object.entries(packages).sort(([a], [b]) => (a === "" ? -1 : b === "" ? 1 : a < b ? -1 : a > b ? 1 : 0)));
writeFileSync(lockPath, JSON.stringify(lock, null, 2) + "\n");
console.log(`${added} entries added`);
