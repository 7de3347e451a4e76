import { create, fromBinary } from "@bufbuild/protobuf";
import { ReleaseManifestSchema } from "../gen/rexmesh/v1/release_pb.js";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { printable } from "../common/limits.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { StepSchema } from "../gen/rexmesh/v1/task_pb.js";
import type { Job } from "../gen/rexmesh/v1/controller_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import { buildJobRequest, watch, type Io } from "./operator.js";
import { table } from "./table.js";

const options: Record<string, OptionSpec> = {
  to: { type: "string", doc: "the release version to update to (rexmesh release list)", value: "V" },
  hosts: { type: "string", short: "H", doc: "comma-separated host ids", value: "IDS" },
  all: { type: "boolean", short: "a", doc: "every host of your tenant" },
  target: { type: "string", short: "t", doc: "the hosts matching a query", value: "QUERY" },
  canary: { type: "string", doc: "the first N hosts update first; if one fails or is rolled back, no other host starts", value: "N" },
  "max-in-flight": { type: "string", doc: "hosts updating at once, a number or a percentage (default: no limit)", value: "N|N%" },
  "max-failures": { type: "string", doc: "failed or rolled-back hosts tolerated; after that, hosts not yet started are SKIPPED (default 0)", value: "N|N%" },
  deadline: { type: "string", doc: "hosts that have not started the update by then skip it (EXPIRED)", value: "DURATION" },
  "lost-after": { type: "string", doc: "a host unreachable this long ends its update LOST", value: "DURATION" },
  "retry-rolled-back": { type: "boolean", doc: "try the version again on hosts that rolled it back before (by default they refuse it)" },
  "allow-downgrade": { type: "boolean", doc: "take a release older than the version a host runs (by default refused)" },
  "idempotency-key": { type: "string", doc: "submitting again with the same key returns the same job", value: "KEY" },
  "dry-run": { type: "boolean", doc: "show the hosts and the step; update nothing" },
  detach: { type: "boolean", short: "d", doc: "print the job id and return without waiting" },
  json: { type: "boolean", doc: "JSON output" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE = "rexmesh update --to V (-H IDS | --all | -t QUERY) [--canary N] [--max-in-flight N|N%] [--max-failures N|N%] [--detach] | rexmesh update status [JOB]";

const ABOUT = `Updates daemons to a signed release (docs/updates.md), in waves: the
canary hosts first, then the rest, so many at once, stopping when too many
fail. Each host checks the release against its --release-keys, unpacks it
beside the running version and restarts into it under its supervisor; a
version that does not connect and report in time is rolled back, reported,
and never tried again on that host. An update is an ordinary job (tool
'update'): 'rexmesh jobs' and 'rexmesh update status' show it.

`;

/** `rexmesh update --to V …` and `rexmesh update status [JOB]`. */
export async function updateCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(
      ABOUT +
        helpText(USAGE, options, [
          "rexmesh update --to 0.2.0 -t 'env=staging' --canary 1",
          "rexmesh update --to 0.2.0 --all --canary 2 --max-in-flight 10% --max-failures 3",
          "rexmesh update status",
          "rexmesh hosts            # VERSION column",
        ]),
    );
    return 0;
  }
  const [sub, ...extra] = p.positionals;
  if (sub === "status") {
    if (extra.length > 1) throw new InvalidArgumentError(`rexmesh update status [JOB]`);
    return status(extra[0], v, io);
  }
  if (sub !== undefined) throw new InvalidArgumentError(`unknown update command ${JSON.stringify(sub)}: ${USAGE}`);
  if (p.rest.length > 0) throw new InvalidArgumentError("update runs no command: leave out what comes after --");
  if (typeof v.to !== "string" || v.to === "") throw new InvalidArgumentError("--to V is required: the release version (rexmesh release list)");
  // Checked under their own names here: run's request builder would name --batch, --concurrency and --max-errors.
  for (const [flag, value, percent] of [["--canary", v.canary, false], ["--max-in-flight", v.maxInFlight, true], ["--max-failures", v.maxFailures, true]] as const) {
    if (value === undefined) continue;
    const m = /^(\d+)(%?)$/.exec(String(value).trim());
    const zeroOk = flag === "--max-failures";
    if (!m || (m[2] && !percent) || Number(m[1]) > (m[2] ? 100 : Number.MAX_SAFE_INTEGER) || (!zeroOk && Number(m[1]) === 0)) {
      throw new InvalidArgumentError(`${flag} must be ${percent ? "a whole number or a percentage like 10%" : "a whole number"}${zeroOk ? "" : " of at least 1"}, not ${JSON.stringify(value)}`);
    }
  }
  const { client, close } = operatorClient(v);
  try {
    // Every platform's release of the version: each host takes its own.
    const { releases } = await client.listReleases({ version: v.to }, { signal: io.signal });
    const release = releases[0];
    if (!release?.signed) throw new NotFoundError(`no release ${v.to}: add it first (rexmesh release add FILE --release FILE.release)`);
    // run's request, with the update step in place of a command and the wave options under their job names.
    const { req } = buildJobRequest({ ...v, to: undefined, batch: v.canary, concurrency: v.maxInFlight, maxErrors: v.maxFailures ?? "0" }, ["update"]);
    req.steps = [create(StepSchema, { name: `update to ${release.version}`, tool: { case: "update", value: { releases: releases.map((r) => r.signed!), retryRolledBack: Boolean(v.retryRolledBack), allowDowngrade: Boolean(v.allowDowngrade) } } })];
    const { job, plan } = await client.submitJob(req, { signal: io.signal });
    if (req.dryRun) {
      io.out(v.json ? JSON.stringify({ hosts: plan.map((h) => h.hostId) }) + "\n" : `update to ${release.version} (${releases.map((r) => `${r.platform} ${r.digest}`).join("; ")}) on ${plan.length} host(s): ${plan.map((h) => h.hostId).join(", ")}\n`);
      return 0;
    }
    if (!job) throw new Error("the controller returned no job");
    if (v.detach) {
      io.out(v.json ? JSON.stringify({ job: job.id }) + "\n" : `${job.id}\n`);
      return 0;
    }
    return await watch(client, job.id, Boolean(v.json), io);
  } finally {
    close();
  }
}

function isUpdate(job: Job): boolean {
  return job.steps.length === 1 && job.steps[0]!.tool.case === "update";
}

/** Per host of an update job: its version now, the task's state and what the host said. */
async function status(jobId: string | undefined, v: Record<string, unknown>, io: Io): Promise<number> {
  const { client, close } = operatorClient(v);
  try {
    let id = jobId;
    if (id === undefined) {
      const { jobs } = await client.listJobs({ limit: 200 }, { signal: io.signal });
      const latest = jobs.filter(isUpdate).sort((a, b) => timestampMs(b.createdAt!) - timestampMs(a.createdAt!))[0];
      if (!latest) throw new NotFoundError("no update job (rexmesh update --to V ...)");
      id = latest.id;
    }
    const { job, tasks } = await client.getJob({ jobId: id }, { signal: io.signal });
    if (!job || !isUpdate(job)) throw new InvalidArgumentError(`job ${id} is not an update`);
    const { hosts } = await client.listHosts({ target: "" }, { signal: io.signal });
    const version = new Map(hosts.map((h) => [h.id, h.facts?.daemonVersion ?? ""]));
    const step = job.steps[0]!.tool;
    const first = step.case === "update" ? step.value.releases[0] : undefined;
    const to = first ? fromBinary(ReleaseManifestSchema, first.manifest).version : "?";
    const rows = tasks.map((t) => ({ host: t.hostId, version: version.get(t.hostId) ?? "", state: TaskState[t.state] ?? String(t.state), message: printable(t.message) }));
    if (v.json) {
      io.out(JSON.stringify({ job: job.id, to, state: job.state, hosts: rows }) + "\n");
      return 0;
    }
    const counts = new Map<string, number>();
    for (const r of rows) counts.set(r.state, (counts.get(r.state) ?? 0) + 1);
    io.out(`update ${job.id} to ${to}: ${[...counts].map(([s, n]) => `${n} ${s}`).join(", ")}\n`);
    io.out(table([["HOST", "VERSION", "STATE", "MESSAGE"], ...rows.map((r) => [r.host, r.version, r.state, r.message])]));
    return 0;
  } finally {
    close();
  }
}
