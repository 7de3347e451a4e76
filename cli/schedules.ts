import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError } from "../common/errors.js";
import { printable } from "../common/limits.js";
import { Misfire, Overlap, ScheduleSpecSchema, type Schedule } from "../gen/rexmesh/v1/controller_pb.js";
import { helpText, parse, refuseAddOnly, positiveDuration, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import { buildJobRequest, refuseRepeated, runOptions, type Io } from "./operator.js";
import { table } from "./table.js";

/** `run`'s options that say nothing of a job submitted later, by a schedule. */
const NOT_FOR_SCHEDULES = ["dry-run", "idempotency-key", "detach", "group"] as const;

const scheduleOptions: Record<string, OptionSpec> = {
  cron: { type: "string", doc: "add: when it fires: five fields (minute hour day month weekday), or six with seconds first", value: "'EXPR'" },
  tz: { type: "string", doc: "add: the time zone the expression is read in (IANA name; default UTC)", value: "ZONE" },
  misfire: { type: "string", doc: "add: firings missed while the controller was down: skip, once (default) or all", value: "POLICY" },
  grace: { type: "string", doc: "add: how late a firing may still run as on time (default 1m)", value: "DURATION" },
  overlap: { type: "string", doc: "add: a firing while the previous one's job still runs: allow, skip (default) or queue", value: "POLICY" },
  ...Object.fromEntries(Object.entries(runOptions).filter(([k]) => !(NOT_FOR_SCHEDULES as readonly string[]).includes(k))),
  ...connectionOptions,
  json: { type: "boolean", doc: "JSON output" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE = "rexmesh schedules [list] | add NAME --cron 'EXPR' [--tz ZONE] [--misfire P] [--grace D] [--overlap P] (-H IDS | --all | -t QUERY) [job options] (-- CMD | --shell S | --doc NAME) | show NAME | pause NAME | resume NAME | remove NAME | run-now NAME";

const ABOUT = `Schedules submit a job by a cron expression in a time zone (docs/schedules.md).
Each firing is an ordinary job of the operator who added the schedule,
authorized when it fires, with the same rate control; 'rexmesh jobs' shows
which schedule a job came from. The schedule's job takes run's options.

`;

const MISFIRES: Record<string, Misfire> = { skip: Misfire.SKIP, once: Misfire.ONCE, all: Misfire.ALL };
const OVERLAPS: Record<string, Overlap> = { allow: Overlap.ALLOW, skip: Overlap.SKIP, queue: Overlap.QUEUE };
const name = (m: Record<string, number>, v: number) => Object.entries(m).find(([, x]) => x === v)?.[0] ?? "?";

/** `rexmesh schedules`: list, add, show, pause, resume, remove, run-now. */
export async function schedulesCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, scheduleOptions);
  const v = p.values;
  if (v.help) {
    io.out(
      ABOUT +
        helpText(USAGE, scheduleOptions, [
          "rexmesh schedules add nightly-backup --cron '30 2 * * *' --tz Europe/Berlin -t 'role=db' -- /usr/local/bin/backup",
          "rexmesh schedules add apt-update --cron '0 6 * * 1' --misfire skip --overlap queue --all --concurrency 10% -- apt-get update",
          "rexmesh schedules",
          "rexmesh schedules show nightly-backup",
          "rexmesh schedules pause nightly-backup",
          "rexmesh schedules run-now nightly-backup",
        ]),
    );
    return 0;
  }
  const [sub = "list", schedule, ...extra] = p.positionals;
  if (sub === "add") {
    if (!schedule || extra.length > 0) throw new InvalidArgumentError(`rexmesh schedules add needs one name: ${USAGE}`);
    return add(schedule, v, p.rest, io);
  }
  if (sub !== "list" && (!schedule || extra.length > 0)) throw new InvalidArgumentError(`rexmesh schedules ${sub} needs one schedule name`);
  // What only `add` takes is refused elsewhere, not silently ignored.
  refuseAddOnly("schedules", scheduleOptions, v, p.rest, ["json", "help", ...Object.keys(connectionOptions)]);
  const { client, close } = operatorClient(v);
  try {
    switch (sub) {
      case "list": {
        const { schedules } = await client.listSchedules({}, { signal: io.signal });
        if (v.json) io.out(JSON.stringify(schedules.map(scheduleJson), null, 2) + "\n");
        else if (schedules.length === 0) io.out("no schedules\n");
        else {
          io.out(
            table([
              ["NAME", "CRON", "ZONE", "STATE", "NEXT", "LAST JOB", "FIRED", "SKIPPED", "MISSED", "BY"],
              ...schedules.map((s) => {
                const j = scheduleJson(s);
                return [j.name, j.cron, j.timezone, j.paused ? "paused" : "active", j.nextRun ?? "", j.lastJobId, String(j.fired), String(j.skipped), String(j.missed), j.createdBy];
              }),
            ]),
          );
        }
        return 0;
      }
      case "show": {
        const { schedule: s } = await client.getSchedule({ name: schedule! }, { signal: io.signal });
        const j = scheduleJson(s!);
        if (v.json) {
          io.out(JSON.stringify(j, null, 2) + "\n");
          return 0;
        }
        io.out(
          [
            `schedule ${j.name} (${j.paused ? "paused" : "active"}), by ${j.createdBy} since ${j.createdAt}`,
            `  cron ${JSON.stringify(j.cron)} in ${j.timezone}; misfire ${j.misfire} (grace ${j.graceSeconds} s); overlap ${j.overlap}`,
            `  runs ${j.what}`,
            `  next ${j.nextRun ?? "-"}; fired ${j.fired}, skipped ${j.skipped}, missed ${j.missed}, waiting ${j.queued}`,
            ...j.recent.map((f) => `  ${f.at}  ${f.jobId || "-"}  ${f.note}`),
          ].join("\n") + "\n",
        );
        return 0;
      }
      case "pause":
      case "resume": {
        const { schedule: s } = await client.pauseSchedule({ name: schedule!, paused: sub === "pause" }, { signal: io.signal });
        io.out(v.json ? JSON.stringify(scheduleJson(s!)) + "\n" : `${schedule}: ${sub === "pause" ? "paused" : `active, next ${scheduleJson(s!).nextRun ?? "-"}`}\n`);
        return 0;
      }
      case "remove":
        await client.deleteSchedule({ name: schedule! }, { signal: io.signal });
        io.out(v.json ? JSON.stringify({ removed: schedule }) + "\n" : `${schedule}: removed\n`);
        return 0;
      case "run-now": {
        const { jobId } = await client.runSchedule({ name: schedule! }, { signal: io.signal });
        io.out(v.json ? JSON.stringify({ job: jobId }) + "\n" : `${jobId}\n`);
        return 0;
      }
      default:
        throw new InvalidArgumentError(`unknown schedules command ${JSON.stringify(sub)} (list, add, show, pause, resume, remove, run-now)`);
    }
  } finally {
    close();
  }
}

async function add(scheduleName: string, v: Record<string, unknown>, rest: string[], io: Io): Promise<number> {
  if (typeof v.cron !== "string") throw new InvalidArgumentError("say when it fires: --cron 'EXPR' (e.g. '30 2 * * *')");
  if (v.stdin === "-") throw new InvalidArgumentError("--stdin - streams this terminal's input now; a schedule's job takes --stdin FILE");
  const policy = <T>(flag: string, map: Record<string, T>): T | undefined => {
    const raw = v[flag];
    if (raw === undefined) return undefined;
    const p = map[String(raw)];
    if (p === undefined) throw new InvalidArgumentError(`--${flag} is one of ${Object.keys(map).join(", ")}, not ${JSON.stringify(raw)}`);
    return p;
  };
  const { req, document, given } = buildJobRequest(v, rest);
  const grace = positiveDuration(v.grace, "--grace", "1m");
  const spec = create(ScheduleSpecSchema, {
    name: scheduleName,
    cron: v.cron,
    timezone: (v.tz as string | undefined) ?? "",
    misfire: policy("misfire", MISFIRES),
    overlap: policy("overlap", OVERLAPS),
    misfireGrace: grace === undefined ? undefined : durationFromMs(grace),
    job: req,
  });
  const { client, close } = operatorClient(v);
  try {
    if (document) await refuseRepeated(client, document, given, io.signal);
    const { schedule } = await client.createSchedule({ schedule: spec }, { signal: io.signal });
    const j = scheduleJson(schedule!);
    io.out(v.json ? JSON.stringify(j) + "\n" : `${j.name}: next ${j.nextRun ?? "-"} (${j.timezone})\n`);
    return 0;
  } finally {
    close();
  }
}

function scheduleJson(s: Schedule) {
  const spec = s.spec!;
  const at = (t: { seconds: bigint; nanos: number } | undefined) => (t ? new Date(timestampMs(t as never)).toISOString() : undefined);
  return {
    name: spec.name,
    cron: spec.cron,
    timezone: spec.timezone,
    misfire: name(MISFIRES, spec.misfire),
    graceSeconds: Number(spec.misfireGrace?.seconds ?? 0n),
    overlap: name(OVERLAPS, spec.overlap),
    paused: s.paused,
    nextRun: at(s.nextRun),
    createdBy: s.createdBy,
    createdAt: at(s.createdAt),
    lastJobId: s.lastJobId,
    fired: Number(s.fired),
    skipped: Number(s.skipped),
    missed: Number(s.missed),
    queued: s.queued,
    what: printable(s.what),
    recent: s.recent.map((f) => ({ at: at(f.at), jobId: f.jobId, note: printable(f.note) })),
  };
}
