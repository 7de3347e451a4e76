/**
 * The posix_spawn addon (native/spawn, daemon/native-spawn.ts) must start a
 * process exactly as Node's spawn(program, args, { detached: true, stdio:
 * "pipe" }) does, which the spawner used before: the same descriptors, a
 * session of its own, default signal dispositions and an empty mask, the
 * environment and working directory given, the program looked up in the
 * child's PATH, the same errors. Each case runs a real process both ways and
 * compares what it reports about itself.
 */
import { spawn, type ChildProcess } from "node:child_process";
import type { EventEmitter } from "node:events";
import { chmodSync, mkdtempSync, realpathSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { PosixChild, loadPosixSpawn, type PosixSpawnFn } from "../../daemon/native-spawn.js";

interface Ran {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  pid: number;
  /** Events in the order they came. */
  events: string[];
}

const loaded = loadPosixSpawn();
const posixSpawn: PosixSpawnFn | undefined = "spawn" in loaded ? loaded.spawn : undefined;

function collect(child: ChildProcess | PosixChild, stdin: string): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const ran: Ran = { code: null, signal: null, stdout: "", stderr: "", pid: child.pid ?? -1, events: [] };
    child.stdout!.on("data", (b: Buffer) => (ran.stdout += b.toString()));
    child.stderr!.on("data", (b: Buffer) => (ran.stderr += b.toString()));
    child.stdin!.on("error", () => {});
    child.stdin!.end(stdin);
    const events: EventEmitter = child;
    events.on("error", reject);
    events.on("exit", (code: number | null, signal: NodeJS.Signals | null) => {
      ran.events.push("exit");
      ran.code = code;
      ran.signal = signal;
    });
    events.on("close", () => {
      ran.events.push("close");
      resolve(ran);
    });
  });
}

function viaPosix(program: string, args: string[], opts: { cwd?: string; env: Record<string, string>; stdin?: string }): Promise<Ran> {
  return collect(new PosixChild(posixSpawn!, program, args, opts), opts.stdin ?? "");
}

function viaNode(program: string, args: string[], opts: { cwd?: string; env: Record<string, string>; stdin?: string }): Promise<Ran> {
  return collect(spawn(program, args, { cwd: opts.cwd, env: opts.env, detached: true, stdio: ["pipe", "pipe", "pipe"] }), opts.stdin ?? "");
}

const env = { PATH: process.env.PATH ?? "/usr/bin:/bin", LANG: "C" };

describe("posix_spawn addon", () => {
  it("is built and loads (npm ci builds it; without it the spawner forks once per process)", () => {
    expect("reason" in loaded ? loaded.reason : "").toBe("");
  });

  it("gives the same output, exit code, and events in the same order as spawn()", async () => {
    const script = 'echo "out $1"; echo err >&2; read line; echo "in $line"; exit 3';
    for (const run of [viaPosix, viaNode]) {
      const ran = await run("sh", ["-c", script, "sh", "a b"], { env, stdin: "hello\n" });
      expect(ran).toMatchObject({ code: 3, signal: null, stdout: "out a b\nin hello\n", stderr: "err\n", events: ["exit", "close"] });
    }
  });

  it("reports death by a signal by its name", async () => {
    for (const run of [viaPosix, viaNode]) {
      const ran = await run("sh", ["-c", "kill -TERM $$"], { env });
      expect(ran).toMatchObject({ code: null, signal: "SIGTERM" });
    }
  });

  it("starts the process in a session and group of its own, with the fds, signal dispositions and mask spawn() gives", async () => {
    // pid, pgrp and session from /proc (fields 1, 5, 6; sh's name has no space); the process's own fds; then its signal masks,
    // read by the process it execs (the shell's own mask changes while it forks).
    const script = 'set -- $(cat /proc/$$/stat); echo "$1 $5 $6"; ls /proc/$$/fd | sort -n | tr "\\n" " "; echo; exec grep -E "^(SigBlk|SigIgn)" /proc/self/status';
    const posix = await viaPosix("sh", ["-c", script], { env });
    const node = await viaNode("sh", ["-c", script], { env });
    expect(posix.code).toBe(0);
    const [ids, fds, blocked, ignored] = posix.stdout.trim().split("\n");
    const [, nodeFds, nodeBlocked] = node.stdout.trim().split("\n");
    expect(ids).toBe(`${posix.pid} ${posix.pid} ${posix.pid}`);
    expect(fds!.trim().split(" ").slice(0, 3)).toEqual(["0", "1", "2"]);
    // Anything past 0-2 is what the test runner itself leaves without close-on-exec: nothing spawn() would not pass too.
    expect(fds!.trim().split(" ").filter((fd) => !nodeFds!.trim().split(" ").includes(fd))).toEqual([]);
    expect(blocked).toBe("SigBlk:\t0000000000000000");
    expect(blocked).toBe(nodeBlocked);
    // SIGPIPE (13), ignored by Node in this process, is back at default; only glibc's own 32 and 33 may be ignored (spawn.c says why).
    const ign = BigInt(`0x${ignored!.split("\t")[1]}`);
    expect(ign & ~(3n << 31n)).toBe(0n);
  });

  it("passes exactly the environment given and runs in the working directory given", async () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "rexmesh-nspawn-")));
    const e = { ...env, ONE: "1", SPACED: "a b=c", EMPTY: "" };
    for (const run of [viaPosix, viaNode]) {
      const ran = await run("sh", ["-c", "pwd; env | sort"], { env: e, cwd: dir });
      const [pwd, ...vars] = ran.stdout.trim().split("\n");
      expect(pwd).toBe(dir);
      // sh adds PWD (and dash OLDPWD) itself.
      expect(vars.filter((v) => !/^(PWD|OLDPWD)=/.test(v))).toEqual(Object.entries(e).map(([k, v]) => `${k}=${v}`).sort());
    }
  });

  it("looks the program up in the child's PATH, relative names from the child's working directory", async () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "rexmesh-nspawn-")));
    writeFileSync(join(dir, "only-here"), "#!/bin/sh\necho found $0\n");
    chmodSync(join(dir, "only-here"), 0o755);
    for (const run of [viaPosix, viaNode]) {
      // The script's $0 is the path it was found at.
      expect((await run("only-here", [], { env: { PATH: `/nonexistent:${dir}` } })).stdout).toBe(`found ${dir}/only-here\n`);
      expect((await run("./only-here", [], { env, cwd: dir })).stdout).toBe("found ./only-here\n");
    }
  });

  it("fails with the errno's code where spawn() fails: not found, not executable, no such working directory", async () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "rexmesh-nspawn-")));
    writeFileSync(join(dir, "not-exec"), "#!/bin/sh\necho no\n");
    const cases: Array<[string, { cwd?: string; env: Record<string, string> }, string]> = [
      ["rexmesh-no-such-program", { env }, "ENOENT"],
      [join(dir, "nothing"), { env }, "ENOENT"],
      ["not-exec", { env: { PATH: dir } }, "EACCES"],
      [join(dir, "not-exec"), { env }, "EACCES"],
      ["true", { env, cwd: join(dir, "gone") }, "ENOENT"],
    ];
    for (const [program, opts, code] of cases) {
      expect(() => new PosixChild(posixSpawn!, program, [], opts), program).toThrow(expect.objectContaining({ code }));
      const nodeErr = await viaNode(program, [], opts).then(() => undefined, (err: NodeJS.ErrnoException) => err.code);
      expect(nodeErr, `spawn() of ${program}`).toBe(code);
    }
  });

  it("refuses a NUL byte in an argument, the environment or the program with a TypeError, starting nothing", () => {
    expect(() => new PosixChild(posixSpawn!, "echo", ["a\0b"], { env })).toThrow(TypeError);
    expect(() => new PosixChild(posixSpawn!, "echo", [], { env: { ...env, X: "a\0b" } })).toThrow(TypeError);
    expect(() => new PosixChild(posixSpawn!, "ec\0ho", [], { env })).toThrow(expect.objectContaining({ code: "ERR_INVALID_ARG_VALUE" }));
  });

  it("keeps an exited process's pid its own until its exit was reported (a zombie, not reaped by Node)", async () => {
    const child = new PosixChild(posixSpawn!, "true", [], { env });
    child.stdin.end();
    // Busy for 300 ms: the process has exited, but this module reaps only when the loop turns.
    const until = Date.now() + 300;
    while (Date.now() < until);
    const { readFileSync } = await import("node:fs");
    expect(readFileSync(`/proc/${child.pid}/stat`, "utf8")).toMatch(/^\d+ \(true\) Z /);
    const ran = await collect(child, "");
    expect(ran.code).toBe(0);
  });
});
