// Builds the posix_spawn addon (native/spawn) with node-gyp; run by `npm ci`
// (the package's install script). A machine that cannot build it (no C
// compiler) still runs every role: the spawner then starts processes with
// Node's spawn(), a fork of itself each (daemon/native-spawn.ts), and says so
// in the daemon's log. So a failed build warns and does not fail the install.
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";

if (process.platform !== "linux") process.exit(0);
const dir = fileURLToPath(new URL("../native/spawn", import.meta.url));
// npm gives its lifecycle scripts its own node-gyp (npm_config_node_gyp); otherwise the one on PATH.
const gyp = process.env.npm_config_node_gyp;
const [cmd, args] = gyp ? [process.execPath, [gyp, "rebuild"]] : ["node-gyp", ["rebuild"]];
const run = spawnSync(cmd, args, { cwd: dir, stdio: ["ignore", "inherit", "inherit"] });
if (run.status !== 0) {
  const why = run.error ? run.error.message : `exit ${run.status ?? run.signal}`;
  process.stderr.write(`\nrexmesh: the posix_spawn addon (native/spawn) was not built (${why}).\n` +
    "The daemon's spawner will start processes with Node's spawn() instead (slower to start many processes).\n");
}
