import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { InvalidArgumentError } from "../common/errors.js";
import { SubmitJobRequestSchema } from "../gen/rexmesh/v1/controller_pb.js";
import { StepSchema } from "../gen/rexmesh/v1/task_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { operatorClient } from "./client.js";
import { LocalMesh } from "./launcher.js";
import type { Io } from "./operator.js";
import { JobPrinter } from "./printer.js";

const REGION_NAMES = ["eu-west", "us-east", "ap-south", "sa-east", "af-south", "me-central"];

const devOptions: Record<string, OptionSpec> = {
  hosts: { type: "string", short: "n", doc: "number of hosts (default 6)", value: "N" },
  regions: { type: "string", short: "r", doc: "number of regions, one proxy each (default 2)", value: "R" },
  dir: { type: "string", doc: "where certificates, logs and state go (default .rexmesh-dev)", value: "DIR" },
  "hosts-per-process": { type: "string", doc: "hosts served by one daemon process (default: up to 25)", value: "K" },
  demo: { type: "boolean", doc: "run a first job on every host once the mesh is up" },
  "log-level": { type: "string", doc: "log level of the mesh processes (default info)", value: "LEVEL" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

function count(value: unknown, name: string, dflt: number, max: number): number {
  if (value === undefined) return dflt;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > max) throw new InvalidArgumentError(`--${name} must be a whole number from 1 to ${max}`);
  return n;
}

/**
 * `rexmesh dev`: a whole mesh on loopback (controller, a proxy per region,
 * daemons) with certificates issued on the spot; prints the exports an
 * operator pastes, stays in the foreground, stops everything on Ctrl-C.
 */
export async function devCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, devOptions);
  const v = p.values;
  if (v.help) {
    io.out(helpText("rexmesh dev [--hosts N] [--regions R] [--dir DIR] [--demo]", devOptions, ["rexmesh dev", "rexmesh dev --hosts 50 --regions 3"]));
    return 0;
  }
  const hostCount = count(v.hosts, "hosts", 6, 10_000);
  const regionCount = count(v.regions, "regions", 2, 64);
  const regions = Array.from({ length: regionCount }, (_, i) => REGION_NAMES[i] ?? `region-${i + 1}`);
  const width = String(hostCount).length < 2 ? 2 : String(hostCount).length;
  const hosts = Array.from({ length: hostCount }, (_, i) => ({ id: `host-${String(i + 1).padStart(width, "0")}`, region: regions[i % regionCount]! }));
  const perProcess = count(v.hostsPerProcess, "hosts-per-process", Math.min(25, Math.max(1, Math.ceil(hostCount / regionCount))), 10_000);
  const dir = (v.dir as string | undefined) ?? ".rexmesh-dev";
  const mesh = new LocalMesh({ dir, regions, hosts, hostsPerProcess: perProcess, logLevel: (v.logLevel as string | undefined) ?? "info" });

  let stopping = false;
  const stopped = new Promise<void>((resolve) => {
    const onSignal = () => {
      if (stopping) return;
      stopping = true;
      io.err("\nstopping the mesh...\n");
      mesh.stop().then(resolve, (err: unknown) => {
        io.err(`stopping the mesh failed: ${err instanceof Error ? err.message : String(err)}\n`);
        resolve();
      });
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });

  io.err(`starting a mesh: 1 controller, ${regionCount} proxies (${regions.join(", ")}), ${hostCount} hosts in ${Math.ceil(hostCount / perProcess)} daemon processes\n`);
  try {
    await mesh.start();
    await mesh.waitForHosts(hostCount);
  } catch (err) {
    await mesh.stop(1000);
    throw err;
  }
  mesh.writeEnvFile(join(mesh.dir, "env"));
  io.out(`\nrexmesh dev mesh is up. To use it from another shell:\n\n`);
  for (const [k, val] of Object.entries(mesh.exports())) io.out(`export ${k}=${val}\n`);
  io.out(`\n(or: source ${join(mesh.dir, "env")})   logs: ${join(mesh.dir, "logs")}\n`);
  io.out(`try:  rexmesh hosts   |   rexmesh run --all -- uname -a\n\n`);

  if (v.demo) {
    const script = 'echo "hello from $REXMESH_HOST_ID ($(uname -s) $(uname -m)), task $REXMESH_TASK_ID"';
    io.out(`first job: rexmesh run --all --shell '${script}'\n\n`);
    const { client, close } = operatorClient({}, mesh.exports());
    try {
      const { job } = await client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, steps: [create(StepSchema, { tool: { case: "shell", value: { script } } })] }));
      const printer = new JobPrinter({ json: false, write: io.out, color: io.isTTY });
      for await (const batch of client.watchJob({ jobId: job!.id })) printer.handle(batch);
      printer.summary();
    } finally {
      close();
    }
  }
  io.out(`\nthe mesh keeps running; Ctrl-C stops it\n`);
  await stopped;
  io.err("mesh stopped\n");
  return 0;
}
