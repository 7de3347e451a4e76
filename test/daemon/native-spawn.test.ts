/**
 * The posix_spawn addon (native/spawn, daemon/native-spawn.ts) must start a
 * process exactly as Node's spawn(program, args, { detached: true, stdio:
 * "pipe" }) does, which the spawner used before: the same descriptors, a
 * session of its own, default signal dispositions and an empty mask, the
 * environment and working directory given, the program looked up in the
 * child's PATH, the same errors. Each case runs a real process both ways and
 * compares what it reports about itself.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import type { EventEmitter } from "node:events";
import { chmodSync, mkdirSync, mkdtempSync, realpathSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { directLauncher, directLauncherWith } from "../../daemon/launcher.js";
import { PosixChild, loadPosixSpawn, startChild, type PosixSpawnFn } from "../../daemon/native-spawn.js";
import type { SpawnFailure } from "../../daemon/spawner-frames.js";

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
/** The addon's function; every test that uses it fails with the reason it is missing, if it is. */
const posixSpawnOrWhy: PosixSpawnFn = "spawn" in loaded ? loaded.spawn : () => {
  throw new Error(`the posix_spawn addon is not loaded: ${loaded.reason}`);
};
const posixSpawn = posixSpawnOrWhy as PosixSpawnFn | undefined;

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

/** The errors Node's spawn() emits as 'error' instead of throwing. */
const ASYNC_SPAWN_ERRORS = new Set(["EACCES", "EAGAIN", "EMFILE", "ENFILE", "ENOENT"]);

/** How spawn() fails for this: its code, and whether it threw. */
async function nodeFailure(program: string, opts: { cwd?: string; env: Record<string, string> }): Promise<{ code?: string; sync: boolean }> {
  try {
    const child = spawn(program, [], { cwd: opts.cwd, env: opts.env, detached: true, stdio: ["pipe", "pipe", "pipe"] });
    return await new Promise((resolve) => {
      child.on("error", (err: NodeJS.ErrnoException) => resolve({ code: err.code, sync: false }));
      child.on("close", () => resolve({ sync: false }));
    });
  } catch (err) {
    return { code: (err as NodeJS.ErrnoException).code, sync: true };
  }
}

describe("posix_spawn addon", () => {
  it("is built and loads (npm ci builds it; without it the spawner forks once per process)", () => {
    expect("reason" in loaded ? loaded.reason : "").toBe("");
  });

  it("starts the daemon's own steps too (no spawner): the daemon is not forked", async () => {
    // glibc's posix_spawn leaves signals 32 and 33 ignored in the child (its own; a fork-based spawn() resets them): the mark of the path taken.
    const ignored = (launcher: typeof directLauncher) =>
      new Promise<string>((resolve, reject) => {
        let out = "";
        let ends = 3; // both pipes closed and the exit
        const end = () => --ends === 0 && resolve(out.trim());
        launcher.launch(
          { program: "grep", args: ["^SigIgn", "/proc/self/status"], env: { PATH: process.env.PATH ?? "/usr/bin:/bin" }, stdin: new Uint8Array() },
          {
            spawned: () => {},
            failed: (f) => reject(new Error(f.message)),
            data: (_stream, buf) => (out += buf.toString()),
            closed: end,
            exited: end,
            lost: (why) => reject(new Error(why)),
          },
        );
      });
    expect(await ignored(directLauncher)).toBe("SigIgn:\t0000000180000000");
    const forking = directLauncherWith(undefined);
    expect(await ignored(forking)).toBe("SigIgn:\t0000000000000000");
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

  it("starts the process in a session and group of its own, with fds 0-2 only, and the signal dispositions and mask spawn() gives", async () => {
    // pid, pgrp and session from /proc (fields 1, 5, 6; sh's name has no space); then its signal masks, read by the
    // process it execs (the shell's own mask changes while it forks).
    const script = 'set -- $(cat /proc/$$/stat); echo "$1 $5 $6"; exec grep -E "^(SigBlk|SigIgn)" /proc/self/status';
    const posix = await viaPosix("sh", ["-c", script], { env });
    const node = await viaNode("sh", ["-c", script], { env });
    expect(posix.code).toBe(0);
    const [ids, blocked, ignored] = posix.stdout.trim().split("\n");
    expect(ids).toBe(`${posix.pid} ${posix.pid} ${posix.pid}`);
    expect(blocked).toBe("SigBlk:\t0000000000000000");
    expect(blocked).toBe(node.stdout.trim().split("\n")[1]);
    // SIGPIPE (13), ignored by Node in this process, is back at default; only glibc's own 32 and 33 may be ignored (spawn.c says why).
    const ign = BigInt(`0x${ignored!.split("\t")[1]}`);
    expect(ign & ~(3n << 31n)).toBe(0n);
    // The fds of a process that lists its own: 0-2 and the directory ls reads (the lowest free one), nothing else. Not
    // even a descriptor this process left without close-on-exec, as lmdb leaves its data file and vitest its worker's
    // channel (fd 3 here), which Node's spawn() passes on.
    const fds = (r: Ran) => r.stdout.trim().split("\n");
    expect(fds(await viaPosix("ls", ["-1", "/proc/self/fd"], { env }))).toEqual(["0", "1", "2", "3"]);
    const inherited = fds(await viaNode("ls", ["-1", "/proc/self/fd"], { env }));
    expect(inherited.slice(0, 3)).toEqual(["0", "1", "2"]);
    // From a process that surely holds one: its fd 3, a pipe its parent gave it (no close-on-exec).
    const addon = fileURLToPath(new URL("../../native/spawn/build/Release/rexmesh_spawn.node", import.meta.url));
    const lister = `
      const { posixSpawn } = require(${JSON.stringify(addon)});
      const { Socket } = require("node:net");
      const [, , out] = posixSpawn("/bin/ls", ["ls", "-1", "/proc/self/fd"], ["PATH=/bin:/usr/bin"], null, () => {});
      let text = "";
      new Socket({ fd: out, readable: true, writable: false }).on("data", (d) => (text += d)).on("end", () => console.log(text.trim().split("\\n").join(",")));`;
    const holder = spawnSync(process.execPath, ["-e", lister], { stdio: ["ignore", "pipe", "inherit", "pipe"], encoding: "utf8" });
    expect(holder.stdout.trim()).toBe("0,1,2,3");
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
      // An entry too long to be a path is passed over.
      expect((await run("true", [], { env: { PATH: `/${"y".repeat(5000)}:/bin:/usr/bin` } })).code).toBe(0);
      // The script's $0 is the path it was found at.
      expect((await run("only-here", [], { env: { PATH: `/nonexistent:${dir}` } })).stdout).toBe(`found ${dir}/only-here\n`);
      expect((await run("./only-here", [], { env, cwd: dir })).stdout).toBe("found ./only-here\n");
    }
  });

  it("fails with the errno's code where spawn() fails, told apart as spawn() does (sync or 'error')", async () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "rexmesh-nspawn-")));
    writeFileSync(join(dir, "not-exec"), "#!/bin/sh\necho no\n");
    mkdirSync(join(dir, "a-dir"));
    writeFileSync(join(dir, "a-file"), "");
    const cases: Array<[string, { cwd?: string; env: Record<string, string> }, string]> = [
      ["rexmesh-no-such-program", { env }, "ENOENT"],
      [join(dir, "nothing"), { env }, "ENOENT"],
      ["not-exec", { env: { PATH: dir } }, "EACCES"],
      [join(dir, "not-exec"), { env }, "EACCES"],
      // A directory named like the program: exec's EACCES, the search going on past it.
      ["a-dir", { env: { PATH: dir } }, "EACCES"],
      ["true", { env, cwd: join(dir, "gone") }, "ENOENT"],
      ["true", { env, cwd: join(dir, "a-file") }, "ENOTDIR"],
      ["rexmesh-no-such-program", { env, cwd: join(dir, "a-file") }, "ENOTDIR"],
    ];
    for (const [program, opts, code] of cases) {
      let posixErr: unknown;
      try {
        new PosixChild(posixSpawn!, program, [], opts);
      } catch (err) {
        posixErr = err;
      }
      expect(posixErr, `posix_spawn of ${program}`).toMatchObject({ code });
      const nodeErr = await nodeFailure(program, opts);
      expect(nodeErr.code, `spawn() of ${program}`).toBe(code);
      expect(ASYNC_SPAWN_ERRORS.has(code), `${program}: spawn() ${nodeErr.sync ? "threw" : "emitted"} ${code}`).toBe(!nodeErr.sync);
    }
  });

  it("runs a file that is neither a binary nor has a #! line with /bin/sh, and goes past a #! whose interpreter is missing", async () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "rexmesh-nspawn-")));
    const later = realpathSync(mkdtempSync(join(tmpdir(), "rexmesh-nspawn-")));
    writeFileSync(join(dir, "plain"), 'echo "plain as sh: $1"\n');
    writeFileSync(join(dir, "bad-interp"), "#!/nonexistent/interpreter\necho first\n");
    writeFileSync(join(later, "bad-interp"), "#!/bin/sh\necho later\n");
    for (const f of [join(dir, "plain"), join(dir, "bad-interp"), join(later, "bad-interp")]) chmodSync(f, 0o755);
    for (const run of [viaPosix, viaNode]) {
      expect(await run(join(dir, "plain"), ["x"], { env })).toMatchObject({ code: 0, stdout: "plain as sh: x\n" });
      expect(await run("bad-interp", [], { env: { PATH: `${dir}:${later}` } })).toMatchObject({ code: 0, stdout: "later\n" });
    }
  });

  it("names a signal as spawn() does (the first of two names), a real-time one as kill -l does", async () => {
    for (const run of [viaPosix, viaNode]) {
      expect(await run("sh", ["-c", "kill -ABRT $$"], { env })).toMatchObject({ code: null, signal: "SIGABRT" });
      expect(await run("sh", ["-c", "kill -IO $$"], { env })).toMatchObject({ code: null, signal: "SIGIO" });
    }
    // spawn() has no name for it and says exit code 0; here the death is told.
    expect(await viaPosix("sh", ["-c", "kill -40 $$"], { env })).toMatchObject({ code: null, signal: "SIGRTMIN+6" });
    expect(await viaNode("sh", ["-c", "kill -40 $$"], { env })).toMatchObject({ code: 0, signal: null });
  });

  it("takes as many arguments as exec does, and lets go of what the process did not read of its stdin when it exits", async () => {
    const many = Array.from({ length: 70_000 }, (_, i) => `a${i}`);
    for (const run of [viaPosix, viaNode]) expect(await run("sh", ["-c", 'echo $#', "sh", ...many], { env })).toMatchObject({ code: 0, stdout: "70000\n" });
    const child = new PosixChild(posixSpawn!, "true", [], { env });
    child.stdin.on("error", () => {});
    child.stdin.write(Buffer.alloc(4 << 20));
    await new Promise((r) => child.on("exit", r));
    expect(child.stdin.destroyed).toBe(true);
  });

  it("refuses a NUL byte in an argument, the environment or the program with a TypeError, starting nothing", () => {
    expect(() => new PosixChild(posixSpawn!, "echo", ["a\0b"], { env })).toThrow(TypeError);
    expect(() => new PosixChild(posixSpawn!, "echo", [], { env: { ...env, X: "a\0b" } })).toThrow(TypeError);
    expect(() => new PosixChild(posixSpawn!, "ec\0ho", [], { env })).toThrow(expect.objectContaining({ code: "ERR_INVALID_ARG_VALUE" }));
    expect(() => new PosixChild(posixSpawn!, "", [], { env })).toThrow(expect.objectContaining({ code: "ERR_INVALID_ARG_VALUE" }));
    expect(() => spawn("", [])).toThrow(expect.objectContaining({ code: "ERR_INVALID_ARG_VALUE" }));
  });

  it("words a refused argument as its own error says, both ways (an errno alone is worded as spawn() words it)", () => {
    for (const [way, fn] of [["posix_spawn", posixSpawn], ["fork", undefined]] as const) {
      for (const [request, says] of [
        [{ program: "echo", args: ["a\0b"], env }, /null bytes/],
        [{ program: "echo", args: [], env: { ...env, GREETING: "a\0b" } }, /null bytes/],
        [{ program: "", args: [], env }, /cannot be empty/],
      ] as const) {
        const failures: SpawnFailure[] = [];
        expect(startChild(fn, request, (f) => failures.push(f))).toBeUndefined();
        expect(failures, `${way}: ${JSON.stringify(request.args)}`).toEqual([{ sync: true, code: "ERR_INVALID_ARG_VALUE", message: expect.stringMatching(says) }]);
      }
    }
    const failures: SpawnFailure[] = [];
    startChild(posixSpawn, { program: "echo", args: [], cwd: "/etc/hostname", env }, (f) => failures.push(f));
    expect(failures).toEqual([{ sync: true, code: "ENOTDIR", message: "spawn ENOTDIR" }]);
  });

  it("makes a throw in an exit handler the process's uncaught exception, and reports later exits still", async () => {
    const addon = fileURLToPath(new URL("../../native/spawn/build/Release/rexmesh_spawn.node", import.meta.url));
    const script = `
      const { posixSpawn } = require(${JSON.stringify(addon)});
      process.on("uncaughtException", (e) => {
        console.log("uncaught: " + e.message);
        posixSpawn("true", ["true"], ["PATH=/bin:/usr/bin"], null, (code) => console.log("next exit " + code));
      });
      posixSpawn("true", ["true"], ["PATH=/bin:/usr/bin"], null, () => { throw new Error("boom in onExit"); });`;
    const ran = await viaNode(process.execPath, ["-e", script], { env });
    expect(ran).toMatchObject({ code: 0, stdout: "uncaught: boom in onExit\nnext exit 0\n" });
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
