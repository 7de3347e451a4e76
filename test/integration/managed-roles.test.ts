/**
 * The roles of a local mesh stop when the process that started them is
 * gone, even killed outright (SIGKILL: no handler of its own runs), so that
 * a test runner or `rexmesh dev` killed that way leaves no mesh running
 * beside the next one. A role started by anything else (an operator, a
 * supervisor) is not tied to its parent.
 */
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { describe, expect, it } from "vitest";
import { REXMESH_BIN } from "../../cli/launcher.js";
import { testCa } from "../test-ca.js";
import { isAlive, tempDir, until } from "./support.js";

describe("a local mesh's roles", () => {
  it("drain and exit once the process that started them is SIGKILLed", async () => {
    const dir = tempDir("managed-roles");
    writeFileSync(join(dir, "ca.json"), JSON.stringify(testCa()));
    // The mesh's own process: a controller and a proxy, then it waits (the built launcher, as `rexmesh dev` runs it).
    const launcher = pathToFileURL(join(dirname(REXMESH_BIN), "..", "dist", "cli", "launcher.js")).href;
    const script = [
      `import { readFileSync } from "node:fs";`,
      `import { LocalMesh } from ${JSON.stringify(launcher)};`,
      `const mesh = new LocalMesh({ ca: JSON.parse(readFileSync(${JSON.stringify(join(dir, "ca.json"))}, "utf8")), dir: ${JSON.stringify(join(dir, "mesh"))}, regions: ["r1"], hosts: [] });`,
      `mesh.prepare(); await mesh.startController(); await mesh.startProxies();`,
      `console.log(JSON.stringify({ controller: mesh.controller.proc.pid, proxy: mesh.proxies[0].proc.pid }));`,
      `setInterval(() => {}, 1 << 30);`,
    ].join("\n");
    writeFileSync(join(dir, "mesh.mjs"), script);
    const runner = spawn(process.execPath, [join(dir, "mesh.mjs")], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    runner.stdout.on("data", (b: Buffer) => (out += b.toString()));
    const pids = await until("the mesh to start", async () => (out.includes("\n") ? (JSON.parse(out) as { controller: number; proxy: number }) : undefined), 60_000);
    try {
      await new Promise((r) => setTimeout(r, 1500));
      expect(isAlive(pids.controller) && isAlive(pids.proxy), "the roles run while their mesh's process does").toBe(true);
      runner.kill("SIGKILL");
      // A look a second, then the drain (the mesh's grace: 4 s).
      for (const [role, pid] of Object.entries(pids)) await until(`${role} (pid ${pid}) to exit`, async () => (isAlive(pid) ? undefined : true), 15_000);
      for (const role of ["controller", "proxy-r1"]) {
        const log = readFileSync(join(dir, "mesh", "logs", `${role}.log`), "utf8");
        const line = log.split("\n").find((l) => l.includes('"draining"'));
        expect(line, `${role}: ${log.slice(-800)}`).toMatch(/the process that started it \(pid \d+\) is gone/);
      }
    } finally {
      runner.kill("SIGKILL");
      for (const pid of Object.values(pids)) if (isAlive(pid)) process.kill(pid, "SIGKILL");
    }
  }, 90_000);
});

describe("runService's parent watch", () => {
  const lifecycle = pathToFileURL(join(dirname(REXMESH_BIN), "..", "dist", "common", "lifecycle.js")).href;
  const logger = pathToFileURL(join(dirname(REXMESH_BIN), "..", "dist", "common", "logger.js")).href;
  /** A service that runs until stopped, told `parentPid`; its log lines on stdout. */
  const serve = (parentPid: number) => {
    const script = [
      `const { runService } = await import(${JSON.stringify(lifecycle)});`,
      `const { createLogger } = await import(${JSON.stringify(logger)});`,
      `await runService(async () => ({ info: {}, stop: async () => {} }), { log: createLogger({ level: "info" }, {}), graceMs: 500, parentPid: ${parentPid} });`,
    ].join("\n");
    const p = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    p.stdout.on("data", (b: Buffer) => (out += b.toString()));
    p.stderr.on("data", (b: Buffer) => (out += b.toString()));
    return { p, out: () => out };
  };

  it("stops a service whose named parent was gone before it started (the mesh killed while it loaded)", async () => {
    const gone = spawn("true");
    await new Promise((r) => gone.on("exit", r));
    const s = serve(gone.pid!);
    try {
      const code = await new Promise<number | null>((r) => s.p.on("exit", (c) => r(c)));
      expect(code, s.out()).toBe(0);
      expect(s.out()).toMatch(new RegExp(`the process that started it \\(pid ${gone.pid}\\) is gone`));
    } finally {
      s.p.kill("SIGKILL");
    }
  }, 30_000);

  it("leaves alone a service whose named process is alive but is not its parent (a supervisor's daemon that inherited the variable)", async () => {
    // pid 1 runs, and is not the parent (this process is).
    const s = serve(1);
    try {
      await until("the service to run", async () => (s.out().includes('"running"') ? true : undefined), 20_000);
      await new Promise((r) => setTimeout(r, 2500));
      expect(s.p.exitCode, s.out()).toBe(null);
      expect(s.out()).not.toMatch(/draining/);
    } finally {
      s.p.kill("SIGKILL");
    }
  }, 30_000);
});
