import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { constants as osConstants } from "node:os";
import { setTimeout as delay } from "node:timers/promises";
import { systemClock } from "../common/clock.js";
import { clientFor } from "../common/connect-dial.js";
import { openFrameLink } from "../common/connect-link.js";
import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS, printable } from "../common/limits.js";
import type { FrameLink } from "../common/frame-link.js";
import { framedPort, SessionEndedError, type SessionEnd, type SessionPort } from "../common/session-port.js";
import { keepaliveOf } from "../common/session-frames.js";
import { ControllerService, SessionRequestSchema, type SessionRequest, type SessionResponse, type SessionStarted } from "../gen/rexmesh/v1/controller_pb.js";
import { SessionChannel, SessionSpecSchema, type SessionExit, type SessionSpec } from "../gen/rexmesh/v1/session_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorChannel } from "./client.js";
import type { Io } from "./operator.js";
import { ESCAPE_HELP, EscapeScanner } from "./shell-escape.js";

const options: Record<string, OptionSpec> = {
  tty: { type: "boolean", short: "t", doc: "ask for a terminal on the host even when stdin is not one" },
  "no-tty": { type: "boolean", short: "T", doc: "no terminal: plain stdin, stdout and stderr, even from a terminal" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE = "rexmesh shell HOST [-t|-T] [-- CMD ARGS...]";

const ABOUT = `Opens a session on one host through the mesh: the login shell of the daemon's
user, or CMD with its arguments. From a terminal the host gives it a
terminal of its own (window size followed, Ctrl-C and the like passed on, the
local terminal in raw mode meanwhile); from a pipe or file it runs with plain
stdin, stdout and stderr. The exit status is the remote one (128+N when it
was killed by signal N). Needs the 'session' action in the policy.

Escapes, typed at the start of a line in a terminal session: ~. closes the
session (a host that stopped answering is dropped after 15 s anyway), ~?
lists them, ~~ sends a ~.

`;

/** The terminal the session runs in: the process's own, or a test's. */
export interface Terminal {
  stdin: NodeJS.ReadStream;
  stdout: NodeJS.WriteStream;
  stderr: NodeJS.WriteStream;
}

/** The exit status of the CLI for a process's exit: its code, or 128 + the signal's number. */
export function exitStatus(exit: SessionExit | undefined): number {
  if (!exit) return 255;
  if (exit.code !== undefined) return exit.code & 0xff;
  const n = (osConstants.signals as Record<string, number>)[exit.signal];
  return n ? 128 + n : 255;
}

/**
 * `rexmesh shell`: a session on one host (docs/sessions.md), with the
 * local terminal in raw mode when it is one.
 */
export async function shellCommand(argv: string[], io: Io, term: Terminal = { stdin: process.stdin, stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(ABOUT + helpText(USAGE, options, ["rexmesh shell web-1", "rexmesh shell web-1 -- top", "echo uptime | rexmesh shell web-1", "rexmesh shell db-1 -T -- pg_dump app > app.sql"]));
    return 0;
  }
  const [host, ...extra] = p.positionals;
  if (!host || extra.length > 0) throw new InvalidArgumentError(`say which host, and put the command after --: ${USAGE}`);
  if (v.tty && v.noTty) throw new InvalidArgumentError("-t and -T say opposite things: give one");
  const tty = v.noTty ? false : v.tty ? true : Boolean(term.stdin.isTTY);
  const spec = create(SessionSpecSchema, {
    argv: p.rest,
    tty,
    term: tty ? (process.env.TERM ?? "xterm") : "",
    ...(tty ? { window: { cols: term.stdout.columns || 80, rows: term.stdout.rows || 24 } } : {}),
  });
  return sessionOnHost(host, spec, v, term);
}

/**
 * Runs a session on `host` in `term` until it ends: the remote exit status,
 * or a SessionEndedError with the code and reason of an end without one.
 * `rexmesh shell`, and `rexmesh run --stdin -` (a session without a terminal).
 */
export async function sessionOnHost(host: string, spec: SessionSpec, connection: Record<string, unknown>, term: Terminal = { stdin: process.stdin, stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const { stdin, stdout, stderr } = term;
  const tty = spec.tty;
  const { port, link, opening, release } = await dialSession("session", host, spec, connection);
  const cleanups: (() => void)[] = [];
  try {
    let exit: SessionExit | undefined;
    let closedByEscape = false;
    port.start(
      {
        data: (ch, data) => {
          const out = ch === SessionChannel.STDERR ? stderr : stdout;
          out.write(data, () => port.consumed(data.length));
        },
        exit: (e) => (exit = e),
        // The controller's news (the session's leg was cut, it resumed): a line of its own on stderr.
        notice: (text) => stderr.write(tty ? `\r\nrexmesh: ${printable(text)}\r\n` : `rexmesh: ${printable(text)}\n`),
      },
      opening.frame,
      keepaliveOf(opening.started.keepaliveMs),
    );

    if (tty && stdin.isTTY) {
      stdin.setRawMode(true);
      cleanups.push(() => stdin.setRawMode(false));
    }
    if (tty && stdout.isTTY) {
      const onResize = () => port.sendResize({ $typeName: "rexmesh.v1.WindowSize", cols: stdout.columns, rows: stdout.rows });
      stdout.on("resize", onResize);
      cleanups.push(() => stdout.off("resize", onResize));
    }
    // Without a terminal, the local Ctrl-C goes to the remote process group; with one, it is a byte of input.
    const onInterrupt = () => port.sendSignal("INT");
    const onTerminate = () => port.end({ code: Code.Canceled, message: "the client was stopped" });
    process.on("SIGINT", onInterrupt);
    process.on("SIGTERM", onTerminate);
    process.on("SIGHUP", onTerminate);
    cleanups.push(() => {
      process.off("SIGINT", onInterrupt);
      process.off("SIGTERM", onTerminate);
      process.off("SIGHUP", onTerminate);
    });

    const escapes = tty ? new EscapeScanner() : undefined;
    const onData = (chunk: Buffer) => {
      let bytes: Uint8Array = chunk;
      if (escapes) {
        const r = escapes.scan(chunk);
        bytes = r.send;
        for (const a of r.actions) {
          if (a === "help") stderr.write(`\r\n${ESCAPE_HELP}`);
          else {
            closedByEscape = true;
            port.end({ code: Code.Canceled, message: "closed by the operator (~.)" });
          }
        }
      }
      port.sendData(SessionChannel.STDIN, bytes);
      // Input waits for credit in memory up to a bound; past it stdin is not read (the escape too waits then).
      if (port.queuedBytes >= 4 * LIMITS.sessionWindowBytes && !stdin.isPaused()) {
        stdin.pause();
        port
          .whenQueueBelow(LIMITS.sessionWindowBytes)
          .then(() => stdin.resume())
          .catch(() => undefined);
      }
    };
    const onEnd = () => port.sendEof();
    stdin.on("data", onData);
    stdin.once("end", onEnd);
    stdin.resume();
    cleanups.push(() => {
      stdin.off("data", onData);
      stdin.off("end", onEnd);
      stdin.pause();
    });

    const end: SessionEnd = await port.ended;
    runAll(cleanups);
    if (closedByEscape) {
      stderr.write("\r\nrexmesh: session closed (~.)\r\n");
      // A moment for the close to leave, so the host ends the process now rather than at the keep-alive bound.
      // A timer that holds the process: with only unref'd ones, node would exit here with status 0.
      await Promise.race([link.closed, delay(1000)]);
      return 255;
    }
    if (end.code !== 0) throw new SessionEndedError(`session on ${host} ended: ${printable(end.message)}`, end.code);
    await drained(stdout);
    return exitStatus(exit);
  } finally {
    runAll(cleanups);
    release();
  }
}

/** A session opened through the controller, started by the host: its port (not started yet), the controller's answer, and the way to let go. */
export interface DialledSession {
  port: SessionPort<SessionRequest, SessionResponse>;
  link: FrameLink<SessionRequest, SessionResponse>;
  opening: SessionResponse & { started: SessionStarted };
  /** Ends the session if it still runs (CANCELED) and closes the connection. */
  release: () => void;
}

/**
 * Opens a session (`Session`) or a port forward (`Forward`) on `host` and
 * waits for the controller's answer, which comes once the host joined (it
 * gives up after LIMITS.sessionOpenMs); a refusal is raised with its code.
 */
export async function dialSession(method: "session" | "forward", host: string, spec: SessionSpec, connection: Record<string, unknown>): Promise<DialledSession> {
  const channel = operatorChannel(connection);
  const client = clientFor(ControllerService, channel);
  const link = openFrameLink<SessionRequest, SessionResponse>((out, signal) => client[method](out, { signal }), () => undefined);
  const port = framedPort(link, SessionRequestSchema, {
    clock: systemClock,
    peer: "controller",
    peerSends: "output",
    lingerMs: 1000,
  });
  const release = () => {
    port.end({ code: Code.Canceled, message: "the client went away" });
    channel.close();
  };
  try {
    link.send(create(SessionRequestSchema, { open: { hostId: host, spec } }));
    const opening = await port.opening(LIMITS.sessionOpenMs + 10_000);
    if (!opening?.started) throw new ConnectError("the controller ended the session before it started", Code.Unavailable);
    return { port, link, opening: opening as DialledSession["opening"], release };
  } catch (err) {
    release();
    throw err;
  }
}

function runAll(fns: (() => void)[]): void {
  for (const fn of fns.splice(0)) {
    try {
      fn();
    } catch {
      // A terminal that went away cannot be restored.
    }
  }
}

/** Resolves once what was written to a stream has left it. */
function drained(stream: NodeJS.WriteStream): Promise<void> {
  if (stream.writableLength === 0) return Promise.resolve();
  return new Promise((resolve) => stream.write("", () => resolve()));
}
