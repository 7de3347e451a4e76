import { Code, ConnectError } from "@connectrpc/connect";
import { InvalidArgumentError, RexmeshError } from "../common/errors.js";
import { installFastText } from "../common/fast-text.js";
import { codeOf } from "../common/rpc-errors.js";
import { SessionEndedError } from "../common/session-port.js";
import type { Io } from "./operator.js";

installFastText();

const USAGE = `rexmesh: run commands on many hosts and get every byte of output back

usage: rexmesh COMMAND [options]   (rexmesh COMMAND --help for each)

operators:
  run        run a command on hosts, stream their output live
  ping       check that hosts answer (no process is started)
  shell      a terminal (or CMD) on one host through the mesh: shell HOST [-- CMD]
  forward    a local TCP port through one host to an address it reaches: forward HOST LPORT:ADDR:PORT
  sessions   sessions and forwards, how they ended; play ID replays one, join ID watches one live
  hosts      list hosts (-t QUERY) with their region, proxy, labels; hosts label; hosts queue HOST
  jobs       list jobs; show, watch (replay and follow) or cancel one
  schedules  jobs by a cron expression in a time zone: add, list, show, pause, resume, remove, run-now
  triggers   jobs queued when a host reports an event: add, list, show, pause, resume, remove
             e.g. triggers add fix-nginx --on 'kind=service.failed and unit=nginx.service' -- systemctl restart nginx
  events     events hosts' watchers reported and what triggers did with them: events [-t QUERY] [--kind K]
  release    daemon releases: keygen (a release key, kept apart), sign FILE, add FILE, list, remove V
  update     update daemons to a release in waves: update --to V -t QUERY --canary 1; update status
  docs       store command documents (put FILE), list and show them
  artifacts  put a file in the artifact repository (for script and file.put steps)
  audit      who did what on which hosts, and what was decided
  console    a one-time link that logs a browser in to the web console as you
  bundle     export a region's tasks / import its results (sites with no link)

roles:
  controller the CA, inventory, job planner and public API
  proxy      a regional relay; daemons of its region connect to it
             (proxy bundle import|export-results: the site side of bundles)
  daemon     runs on every host
  supervise  runs a daemon from an install root and carries out its updates

setup:
  ca         create a CA and issue certificates (--role enroll: a zero certificate)
  tokens     create join tokens that new hosts enroll with
  dev        start a whole mesh on this machine (loopback)

Operator commands find the controller and credentials from
--controller/--cert/--key/--ca or REXMESH_CONTROLLER/CERT/KEY/CA.
`;

const COMMANDS = new Set(["run", "ping", "shell", "forward", "sessions", "schedules", "triggers", "events", "release", "update", "supervise", "hosts", "proxies", "operators", "jobs", "docs", "artifacts", "audit", "bundle", "controller", "proxy", "daemon", "ca", "tokens", "dev", "completion", "console"]);

/** Options every operator command takes, accepted before the command too: those that take a value. */
const GLOBAL_VALUE_OPTIONS = new Set(["--controller", "--cert", "--key", "--ca", "--connect-timeout", "--keepalive"]);
/** And those that do not. */
const GLOBAL_FLAGS = new Set(["--json"]);

/**
 * `rexmesh --json jobs` as `rexmesh jobs --json`: the connection options and
 * --json may come before the command (each command still checks that it
 * takes them). Any other option there is an error saying where it goes.
 */
function commandFirst(argv: readonly string[]): string[] {
  const moved: string[] = [];
  let i = 0;
  while (i < argv.length && argv[i]!.startsWith("-") && !["-h", "--help"].includes(argv[i]!)) {
    const arg = argv[i]!;
    const name = arg.includes("=") ? arg.slice(0, arg.indexOf("=")) : arg;
    if (GLOBAL_FLAGS.has(arg)) {
      moved.push(arg);
      i += 1;
    } else if (GLOBAL_VALUE_OPTIONS.has(name)) {
      if (arg === name && (i + 1 >= argv.length || argv[i + 1]!.startsWith("-"))) throw new InvalidArgumentError(`${name} needs a value`);
      moved.push(...(arg === name ? [arg, argv[i + 1]!] : [arg]));
      i += arg === name ? 2 : 1;
    } else {
      const after = argv.slice(i).find((a) => COMMANDS.has(a));
      if (after === undefined) throw new InvalidArgumentError(`unknown option ${arg}: rexmesh COMMAND [options] (rexmesh --help lists the commands)`);
      throw new InvalidArgumentError(`${name} before the command: only ${[...GLOBAL_VALUE_OPTIONS, ...GLOBAL_FLAGS].join(", ")} may come first; put it after the command (rexmesh ${after} ${name} ...)`);
    }
  }
  if (moved.length === 0) return [...argv];
  if (i >= argv.length) throw new InvalidArgumentError(`${moved[0]} but no command: rexmesh COMMAND [options] (rexmesh --help lists the commands)`);
  return [argv[i]!, ...moved, ...argv.slice(i + 1)];
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = commandFirst(argv);
  const abort = new AbortController();
  const io: Io = {
    out: (s) => void process.stdout.write(s),
    err: (s) => void process.stderr.write(s),
    isTTY: Boolean(process.stdout.isTTY),
    signal: abort.signal,
  };
  if (command === "run" || command === "jobs") {
    process.once("SIGINT", () => {
      io.err("\ninterrupted: the job goes on (rexmesh jobs watch/cancel ID)\n");
      abort.abort();
      process.exit(130);
    });
  }
  if (command === "proxy" && rest[0] === "bundle") return (await import("./bundle.js")).proxyBundleCommand(rest.slice(1), io);
  if ((command === "hosts" || command === "proxies" || command === "operators") && rest[0] === "revoke") {
    return (await import("./revoke.js")).revokeCommand(command === "hosts" ? "host" : command === "proxies" ? "proxy" : "operator", rest.slice(1), io);
  }
  // Each command's modules load only when it runs (a daemon never loads the controller's).
  switch (command) {
    case "completion":
      return (await import("./completion.js")).completionCommand(rest, io);
    case "ping":
      return (await import("./ping.js")).pingCommand(rest, io);
    case "shell":
      return (await import("./shell.js")).shellCommand(rest, io);
    case "forward":
      return (await import("./forward.js")).forwardCommand(rest, io);
    case "sessions":
      return (await import("./sessions.js")).sessionsCommand(rest, io);
    case "schedules":
      return (await import("./schedules.js")).schedulesCommand(rest, io);
    case "triggers":
      return (await import("./triggers.js")).triggersCommand(rest, io);
    case "events":
      return (await import("./triggers.js")).eventsCommand(rest, io);
    case "release":
      return (await import("./release.js")).releaseCommand(rest, io);
    case "update":
      return (await import("./update.js")).updateCommand(rest, io);
    case "supervise":
      return (await import("./supervise.js")).superviseCommand(rest, io);
    case "bundle":
      return (await import("./bundle.js")).bundleCommand(rest, io);
    case "controller":
    case "proxy":
    case "daemon":
      return (await import("./roles.js")).runRole(command, rest, io.out);
    case "run":
      return (await import("./operator.js")).runCommand(rest, io);
    case "hosts":
      return (await import("./operator.js")).hostsCommand(rest, io);
    case "audit":
      return (await import("./audit.js")).auditCommand(rest, io);
    case "artifacts":
      return (await import("./artifacts.js")).artifactsCommand(rest, io);
    case "jobs":
      return (await import("./operator.js")).jobsCommand(rest, io);
    case "docs":
      return (await import("./docs.js")).docsCommand(rest, io);
    case "ca":
      return (await import("./ca.js")).caCommand(rest, io);
    case "tokens":
      return (await import("./tokens.js")).tokensCommand(rest, io);
    case "console":
      return (await import("./console.js")).consoleCommand(rest, io);
    case "dev":
      return (await import("./dev.js")).devCommand(rest, io);
    case undefined:
    case "help":
    case "--help":
    case "-h":
      io.out(USAGE);
      return command === undefined ? 2 : 0;
    default:
      io.err(`rexmesh: unknown command ${JSON.stringify(command)}\n\n${USAGE}`);
      return 2;
  }
}

function describe(err: unknown): { message: string; status: number } {
  if (err instanceof ConnectError) {
    // A session its far side ended reached the controller: the hint would point the wrong way.
    const unreachable = err.code === Code.Unavailable && !(err instanceof SessionEndedError) ? " (is the controller running, and REXMESH_CONTROLLER right?)" : "";
    return { message: `${Code[err.code]}: ${err.rawMessage}${unreachable}`, status: err.code === Code.InvalidArgument ? 2 : 1 };
  }
  if (err instanceof RexmeshError) return { message: err.message, status: codeOf(err) === Code.InvalidArgument ? 2 : 1 };
  // A grpc-js status (proxy admin calls): the same shape as Connect's codes.
  const g = err as { code?: unknown; details?: unknown; metadata?: unknown };
  if (typeof g?.code === "number" && typeof g.details === "string" && g.metadata !== undefined) {
    return { message: `${Code[g.code] ?? g.code}: ${g.details}`, status: g.code === Code.InvalidArgument ? 2 : 1 };
  }
  // A bug (a TypeError and the like) keeps its stack for the report; anything
  // else thrown as a plain Error, or by the system (ENOENT, EACCES on a file
  // named in an option or a config), says what it is in one line.
  const bug = err instanceof TypeError || err instanceof RangeError || err instanceof ReferenceError || err instanceof SyntaxError;
  if (err instanceof Error && !bug) return { message: err.message, status: 1 };
  return { message: err instanceof Error ? (err.stack ?? err.message) : String(err), status: 1 };
}

// A reader that goes away (rexmesh run --json ... | head) ends the command quietly.
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code === "EPIPE") process.exit(process.exitCode ?? 0);
  throw err;
});

main(process.argv.slice(2)).then(
  (status) => {
    if (status >= 0) process.exitCode = status;
  },
  (err) => {
    const { message, status } = describe(err);
    process.stderr.write(`rexmesh: ${message}\n`);
    process.exitCode = status;
  },
);
