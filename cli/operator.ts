import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { create, fromBinary, fromJson, toJson, type JsonValue } from "@bufbuild/protobuf";
import { LIMITS, printable } from "../common/limits.js";
import { ReleaseManifestSchema } from "../gen/rexmesh/v1/release_pb.js";
import { Code, ConnectError } from "@connectrpc/connect";
import { durationFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError } from "../common/errors.js";
import { ConnectionState, QueueStage, SubmitJobRequestSchema, type PlannedTask, type SubmitJobRequest } from "../gen/rexmesh/v1/controller_pb.js";
import { StepSchema, type Step } from "../gen/rexmesh/v1/task_pb.js";
import { helpText, parse, positiveDuration, targetQuery, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import { readInputFile } from "./input-file.js";
import { table } from "./table.js";
import { JobPrinter, jobJson, taskJson, taskLine } from "./printer.js";
import { sessionOnHost } from "./shell.js";
import { SessionSpecSchema } from "../gen/rexmesh/v1/session_pb.js";
import { artifactRunOptions, artifactStep } from "./artifacts.js";
import { alternativesDocument } from "./alternatives.js";

export interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
  isTTY: boolean;
  /** Aborted on Ctrl-C: the command stops watching (the job itself goes on). */
  signal: AbortSignal;
}

export const runOptions: Record<string, OptionSpec> = {
  hosts: { type: "string", short: "H", doc: "comma-separated host ids to run on", value: "IDS" },
  all: { type: "boolean", short: "a", doc: "run on every host of your tenant" },
  target: { type: "string", short: "t", doc: "run on the hosts matching a query, e.g. 'env=prod and role in (web,db)'", value: "QUERY" },
  shell: { type: "string", short: "s", doc: "run SCRIPT with /bin/sh -c instead of a command after --", value: "SCRIPT" },
  doc: { type: "string", doc: "run a stored document (rexmesh docs) instead of a command", value: "NAME[@VERSION]" },
  alt: {
    type: "string",
    multiple: true,
    doc: "one way to run the step (repeatable): each host runs the first whose tool it has and whose query it matches; TOOL is exec, shell, python or ansible (docs/tools.md)",
    value: "'TOOL[ when QUERY]: BODY'",
  },
  param: { type: "string", short: "p", multiple: true, doc: "a document parameter (repeatable; repeating a list parameter adds elements)", value: "K=V" },
  "dry-run": { type: "boolean", doc: "show the hosts, the proxy each goes through and the rendered steps; run nothing" },
  timeout: { type: "string", short: "T", doc: "execution timeout per host (e.g. 30s, 5m)", value: "DURATION" },
  deadline: { type: "string", doc: "hosts that have not started the task by then skip it (EXPIRED); more than 0; default: controller's", value: "DURATION" },
  "lost-after": { type: "string", doc: "a host unreachable this long ends its task LOST (default: controller's, 15m); raise it for sites cut off for hours", value: "DURATION" },
  env: { type: "string", short: "e", multiple: true, doc: "environment variable for the command (repeatable)", value: "K=V" },
  cwd: { type: "string", doc: "working directory on the host", value: "DIR" },
  stdin: { type: "string", doc: "file whose content is the command's standard input; '-': this process's stdin, streamed live to one host's command as it is read (a session: needs the 'session' action)", value: "FILE|-" },
  "idempotency-key": { type: "string", doc: "submitting again with the same key returns the same job", value: "KEY" },
  concurrency: { type: "string", short: "c", doc: "hosts running at once, a number or a percentage of the hosts (at least 1 / 1%; default: no limit)", value: "N|N%" },
  "concurrency-per-region": { type: "string", doc: "hosts running at once in each region (at least 1; default: no limit)", value: "N" },
  "max-errors": { type: "string", doc: "failures tolerated (0: none); after that, hosts not yet started are SKIPPED", value: "N|N%" },
  batch: { type: "string", doc: "canary: the first N hosts must succeed before the others start", value: "N" },
  "output-limit": { type: "string", doc: "output bytes kept per host; the rest is dropped and marked truncated", value: "BYTES" },
  json: { type: "boolean", doc: "one JSON object per line per event (docs/cli-json.md)" },
  group: { type: "boolean", short: "b", doc: "at the end, one block per set of hosts with the same outcome and the same output on each stream" },
  detach: { type: "boolean", short: "d", doc: "print the job id and return without waiting" },
  "batch-file": { type: "string", doc: "submit many jobs in one call (SubmitJobs): one SubmitJobRequest per line, in protobuf JSON ('-': stdin); prints each job's id or why it was refused, and waits for none", value: "FILE" },
  ...artifactRunOptions,
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh run`: submit, stream every host's output live, summarize, exit 1 unless every host succeeded. */
export async function runCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, runOptions);
  const v = p.values;
  if (v.help) {
    io.out(
      helpText("rexmesh run (--hosts IDS | --all | -t QUERY) [options] (-- COMMAND [ARGS...] | --shell SCRIPT | --alt ALT... | --doc NAME)", runOptions, [
        "rexmesh run --all -- uname -a",
        "rexmesh run -t 'env=prod and role in (web,db)' -- uptime",
        "rexmesh run -H web-1,web-2 --timeout 30s -- systemctl restart nginx",
        "rexmesh run --all --shell 'df -h / | tail -1'",
        "rexmesh run --all --json -- hostname | jq -r 'select(.type==\"output\") | .text'",
        "rexmesh run --all --batch 2 --concurrency 10% --max-errors 3 -- apt-get -y upgrade",
        "rexmesh run --doc restart-service@2 -p service=nginx -t 'role=web' --dry-run",
        "rexmesh run --all --alt 'ansible: ansible.builtin.service name=nginx state=restarted' --alt 'shell: systemctl restart nginx'",
        "rexmesh run --all --alt 'python: import platform; print(platform.node())' --alt 'exec: uname -n'",
        "rexmesh run --all --alt 'ansible when env=prod: @site.yml release=42' --alt 'python: @deploy.py 42'",
        `rexmesh run --batch-file jobs.jsonl    # lines like {"hostIds":["web-1"],"steps":[{"exec":{"argv":["uptime"]}}]}`,
      ]),
    );
    return 0;
  }
  if (p.positionals.length > 0) throw new InvalidArgumentError(`unexpected ${JSON.stringify(p.positionals[0])}: put the command after --`);
  if (typeof v.batchFile === "string") return batchRun(v, p.rest, io);
  const { hostIds } = jobTarget(v);
  if (v.stdin === "-") return liveStdinRun(v, hostIds, p.rest);
  const { req, document, given } = buildJobRequest(v, p.rest);
  const { client, close } = operatorClient(v);
  try {
    if (document) await refuseRepeated(client, document, given, io.signal);
    const { job, plan } = await client.submitJob(req, { signal: io.signal });
    if (req.dryRun) {
      printPlan(plan, Boolean(v.json), io);
      return 0;
    }
    if (!job) throw new Error("the controller returned no job");
    if (v.detach) {
      io.out(v.json ? JSON.stringify({ type: "job", job: jobJson(job) }) + "\n" : `${job.id}\n`);
      return 0;
    }
    return await watch(client, job.id, Boolean(v.json), io, Boolean(v.group));
  } finally {
    close();
  }
}

/**
 * `rexmesh run --batch-file FILE`: every line a SubmitJobRequest in
 * protobuf JSON, sent SubmitJobs calls of at most LIMITS.batchJobs; one
 * line out per job, in order: its id, or the code and message it was
 * refused with. Exit 0 when every job was accepted, 1 otherwise.
 */
async function batchRun(v: Record<string, unknown>, rest: string[], io: Io): Promise<number> {
  const alone = ["hosts", "all", "target", "shell", "doc", "alt", "param", "dryRun", "stdin", "script", "put", "group", "detach"].filter((k) => v[k] !== undefined && v[k] !== false);
  if (alone.length > 0 || rest.length > 0) throw new InvalidArgumentError(`--batch-file gives every job whole, one per line: leave out ${[...alone.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`), ...(rest.length > 0 ? ["the command after --"] : [])].join(", ")}`);
  const text = (v.batchFile === "-" ? readFileSync(0) : readInputFile(v.batchFile as string, "--batch-file")).toString("utf8");
  const jobs: SubmitJobRequest[] = [];
  text.split("\n").forEach((line, i) => {
    if (line.trim() === "") return;
    try {
      jobs.push(fromJson(SubmitJobRequestSchema, JSON.parse(line) as JsonValue));
    } catch (err) {
      throw new InvalidArgumentError(`${v.batchFile as string}:${i + 1}: not a SubmitJobRequest in protobuf JSON: ${err instanceof Error ? err.message : String(err)}`);
    }
  });
  if (jobs.length === 0) throw new InvalidArgumentError(`${v.batchFile as string} holds no job`);
  const { client, close } = operatorClient(v);
  let refused = 0;
  try {
    for (let at = 0; at < jobs.length; at += LIMITS.batchJobs) {
      const { results } = await client.submitJobs({ jobs: jobs.slice(at, at + LIMITS.batchJobs) }, { signal: io.signal });
      results.forEach((r, k) => {
        const n = at + k + 1;
        const id = r.response?.job?.id;
        if (r.code !== 0 || !id) refused++;
        if (v.json) io.out(JSON.stringify(r.code === 0 ? { line: n, job: id } : { line: n, code: Code[r.code] ?? r.code, message: r.message }) + "\n");
        else io.out(r.code === 0 ? `${n}: ${id}\n` : `${n}: refused, ${Code[r.code] ?? r.code}: ${printable(r.message)}\n`);
      });
    }
  } finally {
    close();
  }
  if (!v.json) io.err(`${jobs.length - refused} of ${jobs.length} jobs submitted${refused > 0 ? `, ${refused} refused` : ""}\n`);
  return refused > 0 ? 1 : 0;
}

/** Where a job runs, from -H, --all or -t: exactly one of them. */
export function jobTarget(v: Record<string, unknown>, optional = false): { hostIds: string[]; target: string | undefined } {
  const hostIds = typeof v.hosts === "string" ? v.hosts.split(",").map((s) => s.trim()).filter(Boolean) : [];
  const target = targetQuery(v.target);
  const ways = (v.all ? 1 : 0) + (hostIds.length > 0 ? 1 : 0) + (target !== undefined ? 1 : 0);
  if (ways === 0 && !optional) throw new InvalidArgumentError("say where to run: --hosts IDS, --all or -t QUERY");
  if (ways > 1) throw new InvalidArgumentError("--hosts, --all and --target cannot be used together");
  return { hostIds, target };
}

/**
 * The SubmitJob request that `run`'s options describe (and a schedule's
 * job, `schedules add`): the target, the step or document and its
 * parameters, the job's options. `rest` is what came after --.
 */
export function buildJobRequest(v: Record<string, unknown>, rest: string[], targetOptional = false): { req: SubmitJobRequest; document: string; given: Map<string, string[]> } {
  const { hostIds, target } = jobTarget(v, targetOptional);
  const parameters: Record<string, string> = {};
  const given = new Map<string, string[]>();
  for (const kv of (v.param as string[] | undefined) ?? []) {
    const i = kv.indexOf("=");
    if (i <= 0) throw new InvalidArgumentError(`-p ${JSON.stringify(kv)} is not KEY=VALUE`);
    const list = given.get(kv.slice(0, i)) ?? [];
    list.push(kv.slice(i + 1));
    given.set(kv.slice(0, i), list);
  }
  for (const [k, list] of given) parameters[k] = list.length === 1 ? list[0]! : JSON.stringify(list);
  const document = typeof v.doc === "string" ? v.doc : "";
  if (given.size > 0 && !document) throw new InvalidArgumentError("-p is for document parameters: add --doc NAME");
  const alts = (v.alt as string[] | undefined) ?? [];
  let step = document || alts.length > 0 ? undefined : artifactStep(v, rest);
  if (alts.length > 0) {
    if (document || typeof v.shell === "string" || rest.length > 0 || v.script !== undefined || v.put !== undefined) {
      throw new InvalidArgumentError("--alt gives the whole step: leave out --doc, --shell, --script, --put and a command after --");
    }
  } else if (document) {
    if (typeof v.shell === "string" || rest.length > 0) throw new InvalidArgumentError("give either --doc or a command (after --, --shell, --script or --put), not both");
  } else if (step !== undefined) {
    if (typeof v.shell === "string") throw new InvalidArgumentError("--shell cannot be combined with --script or --put");
  } else if (typeof v.shell === "string") {
    if (rest.length > 0) throw new InvalidArgumentError("give either --shell SCRIPT or a command after --, not both");
    step = create(StepSchema, { tool: { case: "shell", value: { script: v.shell } } });
  } else {
    if (rest.length === 0) throw new InvalidArgumentError("no command: put it after --, e.g. rexmesh run --all -- uptime");
    step = create(StepSchema, { tool: { case: "exec", value: { argv: rest } } });
  }
  const env: Record<string, string> = {};
  for (const kv of (v.env as string[] | undefined) ?? []) {
    const i = kv.indexOf("=");
    if (i <= 0) throw new InvalidArgumentError(`--env ${JSON.stringify(kv)} is not K=V`);
    env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  // Zero means "no limit" (or the default) on the wire; typed on the command
  // line it is far more likely a mistake, so only --max-errors takes it.
  const count = (name: string, allowPercent: boolean, unset?: string): { n?: number; pct?: number } => {
    const raw = v[name];
    if (typeof raw !== "string") return {};
    const flag = `--${name.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())}`;
    const m = /^(\d+)(%?)$/.exec(raw.trim());
    if (!m || (m[2] && !allowPercent)) throw new InvalidArgumentError(`${flag} must be ${allowPercent ? "a whole number or a percentage like 10%" : "a whole number"}, not ${JSON.stringify(raw)}`);
    const n = Number(m[1]);
    if (m[2] && n > 100) throw new InvalidArgumentError(`${flag} must be a percentage from ${unset ? 1 : 0}% to 100%, not ${JSON.stringify(raw)}`);
    if (n === 0 && unset) throw new InvalidArgumentError(`${flag} must be at least ${m[2] ? "1%" : "1"}, not ${JSON.stringify(raw)} (leave it out for ${unset})`);
    return m[2] ? { pct: n } : { n };
  };
  const conc = count("concurrency", true, "no limit");
  const errs = count("maxErrors", true);
  const rate = {
    concurrency: conc.n ?? 0,
    concurrencyPercent: conc.pct ?? 0,
    concurrencyPerRegion: count("concurrencyPerRegion", false, "no limit").n ?? 0,
    maxErrors: errs.n,
    maxErrorsPercent: errs.pct,
    batch: count("batch", false, "no canary batch").n ?? 0,
  };
  const duration = (ms: number | undefined) => (ms === undefined ? undefined : durationFromMs(ms));
  const req = create(SubmitJobRequestSchema, {
    rate,
    outputLimitBytes: BigInt(count("outputLimit", false, "the daemon's default").n ?? 0),
    hostIds,
    allHosts: Boolean(v.all),
    target,
    steps: step ? [step] : [],
    document,
    documentContent: alts.length > 0 ? alternativesDocument(alts) : "",
    parameters,
    dryRun: Boolean(v.dryRun),
    env,
    workingDir: (v.cwd as string | undefined) ?? "",
    stdin: typeof v.stdin === "string" ? readInputFile(v.stdin, "--stdin") : new Uint8Array(),
    timeout: duration(positiveDuration(v.timeout, "--timeout", "no timeout")),
    deliveryDeadline: duration(positiveDuration(v.deadline, "--deadline", "the controller's default")),
    lostAfter: duration(positiveDuration(v.lostAfter, "--lost-after", "the controller's default")),
    idempotencyKey: (v.idempotencyKey as string | undefined) ?? "",
  });
  return { req, document, given };
}

/** Options of `run` that have no meaning for a live-stdin run (a session, not a job). */
const JOB_ONLY = ["all", "target", "doc", "alt", "param", "dryRun", "timeout", "deadline", "lostAfter", "env", "cwd", "idempotencyKey", "concurrency", "concurrencyPerRegion", "maxErrors", "batch", "outputLimit", "json", "group", "detach", "script", "put", "to", "baseDir", "mode"];

/**
 * `rexmesh run -H HOST --stdin - -- CMD`: the command runs on one host with
 * this process's stdin streamed to it as it is read (with the session's
 * back-pressure, binary-safe, its end passed on), its stdout and stderr
 * here as they are, its exit status the CLI's. It is a session without a
 * terminal (docs/sessions.md): authorized by the `session` action and the
 * role's `commands`, audited as a session, not stored as a job.
 */
function liveStdinRun(v: Record<string, unknown>, hostIds: string[], rest: string[]): Promise<number> {
  const flag = (k: string) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
  const unusable = JOB_ONLY.filter((k) => v[k] !== undefined && v[k] !== false);
  if (unusable.length > 0) throw new InvalidArgumentError(`--stdin - streams to one host's command as a session; ${unusable.map(flag).join(", ")} ${unusable.length === 1 ? "is" : "are"} for jobs`);
  if (hostIds.length !== 1) throw new InvalidArgumentError(`--stdin - streams to one host: name exactly one with --hosts (not ${hostIds.length})`);
  const argv = typeof v.shell === "string" ? ["/bin/sh", "-c", v.shell] : rest;
  if (argv.length === 0) throw new InvalidArgumentError("say what to run: -- COMMAND [ARGS...] or --shell SCRIPT");
  if (typeof v.shell === "string" && rest.length > 0) throw new InvalidArgumentError("--shell SCRIPT and a command after -- cannot be used together");
  return sessionOnHost(hostIds[0]!, create(SessionSpecSchema, { argv, tty: false }), v);
}

/**
 * A parameter given with -p more than once is a list's elements, or a
 * mistake: the controller would see a JSON array and answer with a pattern
 * or type error that hides the cause. Only asked when something repeats.
 */
export async function refuseRepeated(client: ReturnType<typeof operatorClient>["client"], document: string, given: Map<string, string[]>, signal: AbortSignal): Promise<void> {
  const repeated = [...given].filter(([, list]) => list.length > 1);
  if (repeated.length === 0) return;
  let specs: { name?: unknown; type?: unknown }[];
  try {
    const { document: doc } = await client.getDocument({ name: document }, { signal });
    specs = (JSON.parse(doc?.content ?? "{}") as { parameters?: { name?: unknown; type?: unknown }[] }).parameters ?? [];
  } catch {
    // The submit that follows says what is wrong with the document (not found, not allowed).
    return;
  }
  for (const [name, list] of repeated) {
    const spec = specs.find((x) => x.name === name);
    if (spec && spec.type !== "list") {
      throw new InvalidArgumentError(`parameter ${name} given ${list.length === 2 ? "twice" : `${list.length} times`} (-p ${name}=...), but it is a ${String(spec.type)}, not a list: give it once`);
    }
  }
}

/** A dry run's plan: per host, the proxy it would go through and its rendered steps (or why it is rejected). */
function printPlan(plan: readonly PlannedTask[], json: boolean, io: Io): void {
  if (json) {
    const hosts = plan.map((t) => ({
      host: t.hostId,
      region: t.region,
      proxy: t.proxy,
      connected: t.connected,
      steps: t.steps.map((s) => toJson(StepSchema, s)),
      ...(t.rejected ? { rejected: t.rejected } : {}),
    }));
    io.out(JSON.stringify({ type: "plan", hosts }) + "\n");
    return;
  }
  for (const t of plan) {
    io.out(`${t.hostId}  ${t.region}  via ${t.proxy || "(no proxy yet)"}  ${t.connected ? "connected" : "disconnected"}\n`);
    if (t.rejected) io.out(`  REJECTED: ${t.rejected}\n`);
    t.steps.forEach((s, i) => io.out(`  ${i + 1}. ${describeStep(s)}\n`));
  }
  const rejected = plan.filter((t) => t.rejected).length;
  io.out(`dry run: ${plan.length} host${plan.length === 1 ? "" : "s"}, ${plan.length - rejected} would run, ${rejected} rejected; nothing was stored or run\n`);
}

/** A script as a dry run shows it: on the line, or indented below when it has several lines. */
function textBlock(text: string): string {
  return text.includes("\n") ? "\n" + text.replace(/^/gm, "       ") : text;
}

/** A step as a dry run shows it: the tool, then its fields in words (a file mode in octal). */
function describeStep(s: Step): string {
  const name = s.name ? `${s.name}: ` : "";
  const t = s.tool;
  switch (t.case) {
    case "exec":
      return `${name}exec ${JSON.stringify(t.value.argv)}`;
    case "shell": {
      const via = t.value.interpreter.length > 0 ? ` (${t.value.interpreter.join(" ")})` : "";
      return `${name}shell${via} ${textBlock(t.value.script)}`;
    }
    case "python": {
      const args = t.value.args.length > 0 ? ` args ${JSON.stringify(t.value.args)}` : "";
      return `${name}python${args} ${t.value.artifact || textBlock(t.value.script)}`;
    }
    case "ansible": {
      const { module, moduleArgs, artifact, playbook, vars } = t.value;
      const withVars = Object.keys(vars).length > 0 ? ` vars ${JSON.stringify(vars)}` : "";
      if (module) return `${name}ansible module ${module} ${JSON.stringify(moduleArgs)}${withVars}`;
      return `${name}ansible playbook${withVars} ${artifact || textBlock(playbook)}`;
    }
    case "script": {
      const via = t.value.interpreter.length > 0 ? ` with ${t.value.interpreter.join(" ")}` : "";
      return `${name}script ${t.value.artifact}${via}${t.value.args.length > 0 ? ` args ${JSON.stringify(t.value.args)}` : ""}`;
    }
    case "filePut": {
      const mode = t.value.mode === 0 ? "0644 (default)" : `0${t.value.mode.toString(8).padStart(3, "0")}`;
      return `${name}file.put ${t.value.artifact} to ${t.value.path} in ${t.value.baseDir}, mode ${mode}`;
    }
    case "ping":
      return `${name}ping`;
    case "update": {
      const each = t.value.releases.map((r) => {
        const m = fromBinary(ReleaseManifestSchema, r.manifest);
        return { version: m.version, text: `${m.platform} ${m.digest}, key ${r.keyId}` };
      });
      return `${name}update to ${each[0]?.version ?? "(no release)"}${each.length > 0 ? ` (${each.map((e) => e.text).join("; ")})` : ""}`;
    }
    default:
      return `${name}${JSON.stringify(toJson(StepSchema, s))}`;
  }
}

/** How long a run waits before it says which of its pending hosts are not connected. */
const OFFLINE_NOTICE_MS = 2000;
/** Hosts named in that notice; the rest are counted. */
const OFFLINE_NAMED = 10;

export async function watch(client: ReturnType<typeof operatorClient>["client"], jobId: string, json: boolean, io: Io, group = false): Promise<number> {
  // On a terminal a progress line (done/failed/pending) follows the fan-out.
  const printer = new JobPrinter({ json, write: io.out, color: io.isTTY && !json, group, progress: io.isTTY && !json });
  // A run that waits for hosts that are away says so (on stderr), once, instead of sitting silent.
  let watching = true;
  const notice = json ? undefined : setTimeout(() => {
        // Only a notice: a failed look-up says nothing, and the run goes on.
        sayOffline(client, jobId, printer.pendingHosts(), io, () => watching).catch(() => undefined);
      }, OFFLINE_NOTICE_MS);
  try {
    // A watch the controller ends (it restarted, or the connection broke) is started again: the controller replays
    // the job, and the printer skips the output it already printed.
    let lostAt: number | undefined;
    for (;;) {
      try {
        for await (const batch of client.watchJob({ jobId }, { signal: io.signal })) {
          // Only news counts as an answer: a controller that keeps failing right after it replays the job
          // does not keep the run watching for ever.
          if (printer.handle(batch)) lostAt = undefined;
        }
        break;
      } catch (err) {
        // A keep-alive PING that went unanswered means the way to the controller is silent: that is said at once
        // (--keepalive bounds how long a run may hang), not waited out.
        const lost = brokenWatch(err);
        if (io.signal.aborted || !lost || !WATCH_AGAIN.has(lost.code) || /PING timed out/i.test(lost.rawMessage)) throw err;
        const now = Date.now();
        if (lostAt === undefined) {
          io.err(`rexmesh: lost the watch of job ${jobId} (${Code[lost.code]}: ${lost.rawMessage}); the job goes on at the controller, watching again...\n`);
          lostAt = now;
        } else if (now - lostAt > WATCH_AGAIN_FOR_MS) {
          throw new Error(`no answer from the controller for ${WATCH_AGAIN_FOR_MS / 1000} s (${Code[lost.code]}: ${lost.rawMessage}); the job goes on there: rexmesh jobs watch ${jobId}`, { cause: err });
        }
        await sleep(WATCH_AGAIN_MS, undefined, { signal: io.signal }).catch(() => undefined);
        if (io.signal.aborted) throw err;
      }
    }
  } finally {
    watching = false;
    clearTimeout(notice);
  }
  printer.summary();
  return printer.succeeded ? 0 : 1;
}

/**
 * The error that ended a watch, as a ConnectError when it is one or when
 * the connection itself broke under it (a socket reset, an HTTP/2 stream
 * error: connect-es passes some of those on as they are, seen when a
 * controller restarted mid-run); undefined for anything else (a bug here
 * is not retried).
 */
function brokenWatch(err: unknown): ConnectError | undefined {
  if (err instanceof ConnectError) return err;
  const code = (err as { code?: unknown } | null)?.code;
  if (err instanceof Error && typeof code === "string" && /^(E[A-Z]+|ERR_HTTP2_\w+)$/.test(code)) return new ConnectError(`${code}: ${err.message}`, Code.Unavailable);
  return undefined;
}

/** A watch ended by these is started again: the controller went away (a restart) or the connection broke (not a silent one: see watch). */
const WATCH_AGAIN: ReadonlySet<Code> = new Set([Code.Unavailable, Code.Canceled, Code.Unknown, Code.Internal, Code.DeadlineExceeded]);
/** Between tries, and how long they go on before the run gives up (the job itself goes on). */
const WATCH_AGAIN_MS = 1000;
const WATCH_AGAIN_FOR_MS = 60_000;

async function sayOffline(client: ReturnType<typeof operatorClient>["client"], jobId: string, pending: ReadonlySet<string>, io: Io, watching: () => boolean): Promise<void> {
  if (pending.size === 0) return;
  const { hosts } = await client.listHosts({}, { signal: io.signal });
  const away = hosts.filter((h) => pending.has(h.id) && h.connection !== ConnectionState.CONNECTED).map((h) => h.id);
  // The job may have ended while the hosts were looked up: no notice after its summary.
  if (away.length === 0 || io.signal.aborted || !watching()) return;
  const named = away.slice(0, OFFLINE_NAMED).join(", ") + (away.length > OFFLINE_NAMED ? `, and ${away.length - OFFLINE_NAMED} more` : "");
  io.err(
    `rexmesh: waiting for ${away.length} ${away.length === 1 ? "host that is" : "hosts that are"} not connected: ${named} ` +
      `(a task runs when its host returns, or ends EXPIRED at its delivery deadline; Ctrl-C stops watching and leaves the job running: rexmesh jobs watch ${jobId})\n`,
  );
}

const listOptions: Record<string, OptionSpec> = {
  target: { type: "string", short: "t", doc: "only the hosts matching a query", value: "QUERY" },
  remove: { type: "string", short: "r", multiple: true, doc: "hosts label: remove this label (repeatable)", value: "KEY" },
  unfinished: { type: "boolean", doc: "hosts queue: only tasks not finished yet (queued, delivered, running)" },
  limit: { type: "string", doc: "hosts queue: tasks per page (1-500, default 50)", value: "N" },
  page: { type: "string", doc: "hosts queue: the page after this token (printed at the end of a full page)", value: "TOKEN" },
  json: { type: "boolean", doc: "JSON output" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh hosts [-t QUERY]`: hosts of the tenant with their region, proxy, connection and labels; `hosts label` changes labels. */
export async function hostsCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, listOptions);
  if (p.values.help) {
    io.out(
      helpText("rexmesh hosts [-t QUERY] [--json] | rexmesh hosts label HOST_ID [KEY=VALUE...] [-r KEY...] | rexmesh hosts queue HOST_ID [--unfinished]", listOptions, [
        "rexmesh hosts",
        "rexmesh hosts -t 'role=web and os.family=debian'",
        "rexmesh hosts --json | jq -r '.[] | select(.connected) | .id'",
        "rexmesh hosts label web-1 role=web env=prod",
        "rexmesh hosts label web-1 -r env",
        "rexmesh hosts queue web-1",
        "rexmesh hosts queue web-1 --unfinished --json",
      ]),
    );
    return 0;
  }
  if (p.positionals[0] === "label") return labelHost(p.positionals.slice(1), p.values, io);
  if (p.positionals[0] === "queue") return hostQueue(p.positionals.slice(1), p.values, io);
  if (p.positionals.length > 0) throw new InvalidArgumentError(`unknown hosts command ${JSON.stringify(p.positionals[0])} (label, queue)`);
  if (p.values.unfinished || p.values.limit || p.values.page) throw new InvalidArgumentError("--unfinished, --limit and --page are for rexmesh hosts queue");
  if (p.values.remove) throw new InvalidArgumentError("--remove is for rexmesh hosts label");
  const { client, close } = operatorClient(p.values);
  try {
    const { hosts } = await client.listHosts({ target: targetQuery(p.values.target) ?? "" }, { signal: io.signal });
    const rows = hosts.map((h) => ({
      id: h.id,
      tenant: h.tenant,
      region: h.region,
      proxy: h.proxy,
      connected: h.connection === ConnectionState.CONNECTED,
      state: h.connection === ConnectionState.REVOKED ? "revoked" : h.connection === ConnectionState.CONNECTED ? "connected" : "disconnected",
      ...(h.revokedReason ? { revokedReason: h.revokedReason } : {}),
      since: h.since ? new Date(timestampMs(h.since)).toISOString() : undefined,
      os: h.facts ? `${h.facts.os}/${h.facts.arch}` : "",
      hostname: h.facts?.hostname ?? "",
      version: h.facts?.daemonVersion ?? "",
      labels: { ...h.labels },
    }));
    if (p.values.json) {
      io.out(JSON.stringify(rows, null, 2) + "\n");
      return 0;
    }
    const labelText = (l: Record<string, string>) => Object.entries(l).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([k, val]) => `${k}=${val}`).join(",");
    io.out(table([["HOST", "REGION", "PROXY", "STATE", "SINCE", "OS", "VERSION", "LABELS"], ...rows.map((r) => [r.id, r.region, r.proxy, r.state, r.since ?? "", r.os, r.version, labelText(r.labels)])]));
    return 0;
  } finally {
    close();
  }
}

const STAGES: Record<QueueStage, string> = { [QueueStage.UNSPECIFIED]: "?", [QueueStage.QUEUED]: "queued", [QueueStage.DELIVERED]: "delivered", [QueueStage.RUNNING]: "running", [QueueStage.FINISHED]: "finished" };

/** `rexmesh hosts queue HOST`: the host's tasks of every job, newest first, and where each stands. */
async function hostQueue(args: string[], values: Record<string, unknown>, io: Io): Promise<number> {
  const [hostId, ...extra] = args;
  if (!hostId || extra.length > 0) throw new InvalidArgumentError("rexmesh hosts queue needs one host id");
  const limit = values.limit === undefined ? 0 : Number(values.limit);
  if (values.limit !== undefined && (!Number.isInteger(limit) || limit < 1 || limit > 500)) throw new InvalidArgumentError(`--limit ${JSON.stringify(values.limit)} is not a whole number from 1 to 500`);
  const { client, close } = operatorClient(values);
  try {
    const page = await client.listHostTasks({ hostId, pageSize: limit, pageToken: (values.page as string | undefined) ?? "", unfinished: Boolean(values.unfinished) }, { signal: io.signal });
    const rows = page.tasks.map((t) => ({
      ...taskJson(t.task!),
      job: t.task!.jobId,
      stage: STAGES[t.stage],
      what: t.what,
      submittedBy: t.submittedBy,
      createdAt: t.createdAt ? new Date(timestampMs(t.createdAt)).toISOString() : undefined,
      updatedAt: t.task!.updatedAt ? new Date(timestampMs(t.task!.updatedAt)).toISOString() : undefined,
    }));
    if (values.json) {
      io.out(JSON.stringify({ host: hostId, tasks: rows, ...(page.nextPageToken ? { nextPage: page.nextPageToken } : {}) }, null, 2) + "\n");
      return 0;
    }
    if (rows.length === 0) io.out(`${hostId}: no ${values.unfinished ? "unfinished " : ""}tasks\n`);
    else io.out(table([["TASK", "JOB", "STAGE", "STATE", "CREATED", "BY", "WHAT"], ...rows.map((r) => [r.id, r.job, r.stage, taskLine(page.tasks.find((t) => t.task!.id === r.id)!.task!), r.createdAt ?? "", r.submittedBy, r.what])]));
    if (page.nextPageToken) io.out(`more: rexmesh hosts queue ${hostId}${values.unfinished ? " --unfinished" : ""} --page ${page.nextPageToken}\n`);
    return 0;
  } finally {
    close();
  }
}

/** `rexmesh hosts label ID key=value... [-r key...]`. */
async function labelHost(args: string[], values: Record<string, unknown>, io: Io): Promise<number> {
  const [hostId, ...pairs] = args;
  if (!hostId) throw new InvalidArgumentError("rexmesh hosts label needs a host id");
  const set: Record<string, string> = {};
  for (const kv of pairs) {
    const i = kv.indexOf("=");
    if (i <= 0) throw new InvalidArgumentError(`${JSON.stringify(kv)} is not KEY=VALUE (remove a label with -r KEY)`);
    set[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const remove = (values.remove as string[] | undefined) ?? [];
  if (pairs.length === 0 && remove.length === 0) throw new InvalidArgumentError("give labels to set (KEY=VALUE) or to remove (-r KEY)");
  const { client, close } = operatorClient(values);
  try {
    const { host } = await client.setHostLabels({ hostId, set, remove }, { signal: io.signal });
    const labels = { ...host?.labels };
    io.out(values.json ? JSON.stringify({ id: hostId, labels }) + "\n" : `${hostId}: ${Object.entries(labels).map(([k, val]) => `${k}=${val}`).join(" ") || "(no labels)"}\n`);
    return 0;
  } finally {
    close();
  }
}

const jobsOptions: Record<string, OptionSpec> = {
  json: { type: "boolean", doc: "JSON output" },
  hosts: { type: "string", short: "H", doc: "with cancel: only the job's tasks on these hosts (comma-separated ids); it goes on on the others", value: "IDS" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh jobs show|watch|cancel ID`. */
export async function jobsCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, jobsOptions);
  const [verb, jobId] = p.positionals;
  if (p.values.help) {
    io.out(helpText("rexmesh jobs [show|watch|cancel JOB_ID] [--json]", jobsOptions, ["rexmesh jobs                  # the newest jobs", "rexmesh jobs show j0abc...", "rexmesh jobs watch j0abc...   # replays all output so far, then follows", "rexmesh jobs cancel j0abc...", "rexmesh jobs cancel j0abc... -H web-3,web-7   # only those hosts' tasks"]));
    return 0;
  }
  if (!verb || verb === "list") {
    const { client, close } = operatorClient(p.values);
    try {
      const { jobs } = await client.listJobs({ limit: 50 }, { signal: io.signal });
      const rows = jobs.map(jobJson);
      if (p.values.json) io.out(JSON.stringify(rows, null, 2) + "\n");
      else io.out(table([["JOB", "STATE", "CREATED", "TASKS", "COUNTS", "SCHEDULE"], ...rows.map((j) => [j.id, j.state, j.createdAt ?? "", String(j.tasks), Object.entries(j.counts).map(([s, n]) => `${s}=${n}`).join(" "), j.schedule ?? ""])]));
      return 0;
    } finally {
      close();
    }
  }
  if (!jobId) throw new InvalidArgumentError(`rexmesh jobs ${verb} needs a job id`);
  const json = Boolean(p.values.json);
  const { client, close } = operatorClient(p.values);
  try {
    switch (verb) {
      case "show": {
        const { job, tasks } = await client.getJob({ jobId }, { signal: io.signal });
        const doc = job?.document ? { document: job.document, parameters: { ...job.parameters } } : {};
        if (json) {
          const shown = tasks.map((t) => ({ ...taskJson(t), ...(t.steps.length ? { steps: t.steps.map((x) => toJson(StepSchema, x)) } : {}) }));
          io.out(JSON.stringify({ job: job && { ...jobJson(job), ...doc }, tasks: shown }, null, 2) + "\n");
        } else {
          const j = jobJson(job!);
          io.out(`job ${j.id}  ${j.state}  ${j.tasks} tasks  ${Object.entries(j.counts).map(([s, n]) => `${s}=${n}`).join(" ")}\n`);
          if (job?.document) io.out(`document ${job.document}  ${Object.entries(job.parameters).map(([k, val]) => `${k}=${val}`).join(" ")}\n`);
          io.out(table([["TASK", "HOST", "REGION", "STATE"], ...tasks.map((t) => [t.id, t.hostId, t.region, taskLine(t)])], "  "));
        }
        return 0;
      }
      case "watch":
        return await watch(client, jobId, json, io);
      case "cancel": {
        const hostIds = p.values.hosts ? String(p.values.hosts).split(",").map((h) => h.trim()).filter(Boolean) : [];
        const { job } = await client.cancelJob({ jobId, hostIds }, { signal: io.signal });
        io.out(json ? JSON.stringify({ job: job && jobJson(job) }) + "\n" : hostIds.length ? `cancelled job ${jobId} on ${hostIds.join(", ")}\n` : `cancel requested for job ${jobId}\n`);
        return 0;
      }
      default:
        throw new InvalidArgumentError(`unknown jobs command ${JSON.stringify(verb)} (show, watch, cancel)`);
    }
  } finally {
    close();
  }
}
