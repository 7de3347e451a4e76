import { InvalidArgumentError } from "../common/errors.js";
import { Supervisor } from "../daemon/supervisor.js";
import { helpText, parse, positiveDuration, type OptionSpec } from "./args.js";
import type { Io } from "./operator.js";

const options: Record<string, OptionSpec> = {
  root: { type: "string", doc: "the install root: versions/<V>/ and the current link (docs/updates.md)", value: "DIR" },
  "health-timeout": { type: "string", doc: "how long a new version has to connect and report before it is rolled back (default 60s)", value: "DURATION" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const ABOUT = `Runs the daemon from an install root and carries out its updates
(docs/updates.md): starts ROOT/current/bin/rexmesh.js daemon ARGS; when the
daemon exits to update, switches 'current' to the new version and starts
it; if it does not connect and report within the health timeout (or exits
first), switches back, and the old version reports the rollback. A daemon
that exits otherwise is started again after a backoff. Its stderr is the
supervisor's log; the daemon's own output passes through.

`;

/** `rexmesh supervise --root DIR [--health-timeout D] -- DAEMON ARGS`. */
export async function superviseCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(
      ABOUT +
        helpText("rexmesh supervise --root DIR [--health-timeout D] -- [daemon options]", options, [
          "rexmesh supervise --root /opt/rexmesh -- --config /etc/rexmesh/daemon.yaml",
        ]),
    );
    return 0;
  }
  if (typeof v.root !== "string") throw new InvalidArgumentError("--root DIR is required: the install root (docs/updates.md)");
  if (p.positionals.length > 0) throw new InvalidArgumentError(`put the daemon's options after --, not ${JSON.stringify(p.positionals[0])}`);
  const supervisor = new Supervisor({
    root: v.root,
    args: p.rest,
    healthTimeoutMs: positiveDuration(v.healthTimeout, "--health-timeout", "60s") ?? 60_000,
    log: (line) => io.err(`${new Date().toISOString()} rexmesh supervise: ${line}\n`),
  });
  return supervisor.run();
}
