import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError } from "../common/errors.js";
import { stateName } from "../common/task-state.js";
import { SubmitJobRequestSchema, type Task } from "../gen/rexmesh/v1/controller_pb.js";
import { StepSchema, TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { helpText, parse, positiveDuration, targetQuery, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import type { Io } from "./operator.js";

const options: Record<string, OptionSpec> = {
  hosts: { type: "string", short: "H", doc: "comma-separated host ids", value: "IDS" },
  all: { type: "boolean", short: "a", doc: "every host of your tenant" },
  target: { type: "string", short: "t", doc: "a host query, e.g. 'env=prod and role=web'", value: "QUERY" },
  timeout: { type: "string", doc: "hosts that have not answered by then count as not replying (default 10s)", value: "DURATION" },
  json: { type: "boolean", doc: "one JSON object per host, then a summary" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/**
 * `rexmesh ping`: the liveness check operators run first. Each daemon
 * answers by itself (no process is started); a host that cannot be reached
 * within the timeout is reported as not replying (its task ends EXPIRED).
 */
export async function pingCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(helpText("rexmesh ping (--hosts IDS | --all | -t QUERY) [--timeout 10s] [--json]", options, ["rexmesh ping --all", "rexmesh ping -t 'region=eu-west' --timeout 3s"]));
    return 0;
  }
  const hostIds = typeof v.hosts === "string" ? v.hosts.split(",").map((s) => s.trim()).filter(Boolean) : [];
  const target = targetQuery(v.target);
  const chosen = [hostIds.length > 0, Boolean(v.all), target !== undefined].filter(Boolean).length;
  if (chosen !== 1) throw new InvalidArgumentError("say which hosts: exactly one of --hosts, --all or -t QUERY");
  const timeoutMs = positiveDuration(v.timeout, "--timeout", "10s") ?? 10_000;
  const { client, close } = operatorClient(v);
  try {
    const req = create(SubmitJobRequestSchema, {
      hostIds,
      allHosts: Boolean(v.all),
      ...(target !== undefined ? { target } : {}),
      steps: [create(StepSchema, { tool: { case: "ping", value: {} } })],
      deliveryDeadline: durationFromMs(timeoutMs),
    });
    const { job } = await client.submitJob(req, { signal: io.signal });
    const tasks = new Map<string, Task>();
    for await (const batch of client.watchJob({ jobId: job!.id, noOutput: true }, { signal: io.signal })) for (const t of batch.tasks) tasks.set(t.hostId, t);
    const start = job!.createdAt ? timestampMs(job!.createdAt) : 0;
    const rows = [...tasks.values()]
      .map((t) => ({ host: t.hostId, region: t.region, ok: t.state === TaskState.SUCCEEDED, ms: t.updatedAt ? timestampMs(t.updatedAt) - start : undefined, state: stateName(t.state) }))
      .sort((a, b) => Number(b.ok) - Number(a.ok) || (a.ms ?? 0) - (b.ms ?? 0) || a.host.localeCompare(b.host));
    const replied = rows.filter((r) => r.ok);
    if (v.json) {
      for (const r of rows) io.out(JSON.stringify({ type: "host", ...r }) + "\n");
      io.out(JSON.stringify({ type: "summary", hosts: rows.length, replied: replied.length, slowestMs: replied.at(-1)?.ms }) + "\n");
    } else {
      const w = Math.max(4, ...rows.map((r) => r.host.length));
      for (const r of rows) io.out(`${r.host.padEnd(w)}  ${r.ok ? `ok  ${r.ms} ms` : `no reply (${r.state})`}\n`);
      io.out(`\n${replied.length} of ${rows.length} hosts replied${replied.length ? `; slowest ${replied.at(-1)!.ms} ms` : ""}\n`);
    }
    return replied.length === rows.length ? 0 : 1;
  } finally {
    close();
  }
}
