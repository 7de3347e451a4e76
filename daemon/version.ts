/**
 * The version this daemon reports: the `version` of the package it runs
 * from (dist/daemon/version.js → ../../package.json; from source in tests,
 * ../package.json). A release is a copy of the package with its own
 * package.json, so each version directory reports what it is.
 */
import { readFileSync } from "node:fs";

function packageVersion(): string {
  for (const rel of ["../../package.json", "../package.json"]) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), "utf8")) as { name?: unknown; version?: unknown };
      if (pkg.name === "rexmesh" && typeof pkg.version === "string") return pkg.version;
    } catch {
      // not this one
    }
  }
  return "unknown";
}

export const DAEMON_VERSION = packageVersion();
