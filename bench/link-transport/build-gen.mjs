// Compiles the generated protobuf-es code this benchmark needs (gen/rexmesh/v1/
// agent_link_pb.ts and its imports) into bench/link-transport/.build/, so the
// benchmark does not depend on the rest of the tree compiling.
import { execFileSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
const outDir = join(here, ".build");
const sources = ["agent_link_pb.ts", "host_pb.ts", "task_pb.ts"].map((f) => join(root, "gen", "rexmesh", "v1", f));

export function buildGen({ force = false } = {}) {
  const out = join(outDir, "agent_link_pb.js");
  if (!force && existsSync(out)) {
    const outM = statSync(out).mtimeMs;
    if (sources.every((s) => statSync(s).mtimeMs <= outM)) return outDir;
  }
  const tsc = join(root, "node_modules", "typescript", "bin", "tsc");
  execFileSync(process.execPath, [tsc, "--outDir", outDir, "--rootDir", join(root, "gen", "rexmesh", "v1"),
    "--module", "NodeNext", "--moduleResolution", "NodeNext", "--target", "ES2022", "--strict",
    "--skipLibCheck", "--declaration", "false", "--sourceMap", "false", ...sources], { stdio: "inherit" });
  return outDir;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  buildGen({ force: true });
  console.log("built", outDir);
}
