import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { operatorClient } from "../../cli/client.js";
import type { DevRole } from "../../cli/dev-supervisor.js";
import { REXMESH_BIN } from "../../cli/launcher.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { collectJob, isAlive, rexmesh, tempDir } from "./support.js";

/** `rexmesh dev ARGS` in the background, its stdout and stderr gathered, resolved once the mesh is up. */
async function startDev(args: string[]): Promise<{ proc: ChildProcess; out: () => string; err: () => string; waitErr: (re: RegExp) => Promise<RegExpExecArray>; exited: Promise<number | null> }> {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith("REXMESH_")) delete env[k];
  const proc = spawn(process.execPath, [REXMESH_BIN, "dev", ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  const waiters: { re: RegExp; resolve: (m: RegExpExecArray) => void }[] = [];
  proc.stderr!.on("data", (d) => {
    err += d;
    for (const w of [...waiters]) {
      const m = w.re.exec(err);
      if (m) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  });
  const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    proc.stdout!.on("data", (d) => {
      out += d;
      if (out.includes("Ctrl-C stops it")) resolve();
    });
    proc.on("exit", (code) => reject(new Error(`dev exited ${code} early:\n${out}\n${err}`)));
  });
  const waitErr = (re: RegExp) =>
    new Promise<RegExpExecArray>((resolve) => {
      const m = re.exec(err);
      if (m) resolve(m);
      else waiters.push({ re, resolve });
    });
  return { proc, out: () => out, err: () => err, waitErr, exited };
}

/** The `export K=V` lines of a dev mesh's output or env file. */
function exportsIn(text: string): Record<string, string> {
  return Object.fromEntries([...text.matchAll(/^export (REXMESH_\w+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!]));
}

/** What `npm start` runs: a whole mesh, a first job across regions, and a clean Ctrl-C. */
describe("rexmesh dev --demo", () => {
  it("shows output from several hosts in two regions, then stops everything on SIGINT", async () => {
    const dir = tempDir("dev");
    const { proc, out: outNow, exited } = await startDev(["--hosts", "6", "--regions", "2", "--demo", "--dir", dir]);
    const out = outNow();

    // The exports an operator pastes.
    expect(out).toMatch(/^export REXMESH_CONTROLLER=127\.0\.0\.1:\d+$/m);
    expect(out).toMatch(/^export REXMESH_CERT=.+dev\.crt$/m);
    // Output from every host, live-prefixed; hosts alternate between the two regions.
    for (let i = 1; i <= 6; i++) expect(out).toMatch(new RegExp(`^host-0${i}\\s+out\\| hello from host-0${i} `, "m"));
    expect(out).toMatch(/^6 hosts: 6 succeeded/m);

    // Every process of the mesh, from the ready files, is alive now and gone after SIGINT.
    const pids = readdirSync(join(dir, "run")).map((f) => JSON.parse(readFileSync(join(dir, "run", f), "utf8")).pid as number);
    expect(pids.length).toBe(1 + 2 + 2); // controller, two proxies, a daemon process per region
    const regions = new Set(readdirSync(join(dir, "run")).filter((f) => f.startsWith("proxy-")).map((f) => JSON.parse(readFileSync(join(dir, "run", f), "utf8")).region));
    expect(regions).toEqual(new Set(["eu-west", "us-east"]));
    for (const pid of pids) expect(isAlive(pid)).toBe(true);
    proc.kill("SIGINT");
    expect(await exited).toBe(0);
    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
  });
});

/**
 * The README's quick tour of faults: two proxies per region, a labelled
 * host, a job that prints while `rexmesh dev restart` and `kill` (from
 * "another terminal") take its proxies down, and a role that dies on its own.
 */
describe("rexmesh dev --proxies-per-region 2: kill and restart roles from another terminal", () => {
  it("keeps a running job's output whole through proxy restarts and reports every death", { timeout: 240_000 }, async () => {
    const dir = tempDir("devfaults");
    const dev = await startDev(["--hosts", "4", "--proxies-per-region", "2", "--label", "host-01=role=web", "--tenants", "default,acme", "--dir", dir]);
    const pids = new Set<number>();
    try {
      // The roles, listed at start and by `rexmesh dev roles`; every daemon has both proxies of its region.
      for (const name of ["controller", "proxy-eu-west-1", "proxy-eu-west-2", "proxy-us-east-1", "proxy-us-east-2", "daemon-eu-west-1", "daemon-us-east-2"]) expect(dev.out()).toMatch(new RegExp(`^${name}\\s+running\\s+\\d+`, "m"));
      const listed = await rexmesh(["dev", "roles", "--json", "--dir", dir]);
      expect(listed.code, listed.stderr).toBe(0);
      const roles = new Map(listed.stdout.trim().split("\n").map((l) => JSON.parse(l) as DevRole).map((r) => [r.name, r]));
      expect(roles.size).toBe(7);
      expect(roles.get("daemon-eu-west-1")).toMatchObject({ hosts: ["host-01", "host-03"], proxies: ["proxy-eu-west-1", "proxy-eu-west-2"] });
      for (const r of roles.values()) pids.add(r.pid!);

      // Tenants: the exports are the first tenant's operator, env.acme the other's; the label is set.
      const exports = exportsIn(dev.out());
      const { client, close } = operatorClient({}, exports);
      const acme = operatorClient({}, exportsIn(readFileSync(join(dir, "env.acme"), "utf8")));
      try {
        const { hosts } = await client.listHosts({});
        expect(hosts.map((h) => h.id).sort()).toEqual(["host-01", "host-02"]);
        expect(hosts.find((h) => h.id === "host-01")!.labels).toEqual({ role: "web" });
        expect((await acme.client.listHosts({})).hosts.map((h) => h.id).sort()).toEqual(["host-03", "host-04"]);

        // A job on the labelled host that prints until the test says stop (a file), so the faults strike while it prints.
        const stop = join(dir, "stop-printing");
        const script = 'i=0; while [ ! -e "$STOP" ]; do i=$((i+1)); echo line-$i; sleep 0.05; done; echo end';
        const { job } = await client.submitJob({ target: "role=web", env: { STOP: stop }, steps: [{ tool: { case: "shell", value: { script } } }] });
        const result = collectJob(client, job!.id, AbortSignal.timeout(150_000));
        for await (const batch of client.watchJob({ jobId: job!.id })) if (batch.output.length > 0) break;

        // While it prints: restart the proxy that holds host-01, then kill the other one of its region.
        const holding = (await client.listHosts({ target: "role=web" })).hosts[0]!.proxy;
        const other = holding === "proxy-eu-west-1" ? "proxy-eu-west-2" : "proxy-eu-west-1";
        const restarted = await rexmesh(["dev", "restart", holding, "--dir", dir]);
        expect(restarted.code, restarted.stderr).toBe(0);
        expect(restarted.stdout).toMatch(new RegExp(`^restarted ${holding} \\(pid \\d+, ${roles.get(holding)!.address!.replace(/\./g, "\\.")}\\)\\n$`));
        const killed = await rexmesh(["dev", "kill", other, "--dir", dir]);
        expect(killed.code, killed.stderr).toBe(0);
        expect(killed.stdout).toBe(`killed ${other} (pid ${roles.get(other)!.pid}, SIGKILL)\n`);

        // Every line arrives, once and in order, and the task ends.
        writeFileSync(stop, "");
        const r = await result;
        const task = r.tasks.get("host-01")!;
        expect(task.state, task.message).toBe(TaskState.SUCCEEDED);
        const printed = r.stdout.get("host-01")!.toString();
        const lines = printed.split("\n").length - 2;
        expect(lines).toBeGreaterThan(1);
        expect(printed).toBe(Array.from({ length: lines }, (_, i) => `line-${i + 1}\n`).join("") + "end\n");

        // dev said what happened to each role, one line each.
        expect(dev.err()).toContain(`rexmesh dev: ${holding} stopped (signal SIGKILL) to be restarted`);
        expect(dev.err()).toContain(`rexmesh dev: ${holding} is up again (pid `);
        expect(dev.err()).toMatch(new RegExp(`^rexmesh dev: ${other} stopped \\(signal SIGKILL\\) as asked .*\`rexmesh dev restart ${other}\` starts it again$`, "m"));

        // A role that dies with nobody asking is reported as such, with how it ended.
        const daemon = roles.get("daemon-us-east-2")!;
        process.kill(daemon.pid!, "SIGKILL");
        const died = await dev.waitErr(/^rexmesh dev: daemon-us-east-2 died unexpectedly \(signal SIGKILL, pid (\d+)\); log: (\S+); `rexmesh dev restart daemon-us-east-2` starts it again$/m);
        expect(Number(died[1])).toBe(daemon.pid);
        expect(died[2]).toBe(join(dir, "logs", "daemon-us-east-2.log"));

        // Both come back on their data (and the proxy on its address); the hosts take work again.
        for (const name of [other, "daemon-us-east-2"]) {
          const back = await rexmesh(["dev", "restart", name, "--dir", dir]);
          expect(back.code, back.stderr).toBe(0);
        }
        const after = new Map((await rexmesh(["dev", "roles", "--json", "--dir", dir])).stdout.trim().split("\n").map((l) => JSON.parse(l) as DevRole).map((x) => [x.name, x]));
        for (const x of after.values()) {
          expect(x.running, x.name).toBe(true);
          expect(x.address, x.name).toBe(roles.get(x.name)!.address);
          pids.add(x.pid!);
        }
        const again = await client.submitJob({ allHosts: true, steps: [{ tool: { case: "exec", value: { argv: ["echo", "ok"] } } }] });
        const r2 = await collectJob(client, again.job!.id, AbortSignal.timeout(60_000));
        expect([...r2.tasks.values()].map((t) => TaskState[t.state])).toEqual(["SUCCEEDED", "SUCCEEDED"]);
      } finally {
        close();
        acme.close();
      }

      // Errors are one line on stderr and a non-zero exit.
      const oneLine = (x: { code: number; stdout: string; stderr: string }, code: number, re: RegExp) => {
        expect(x.code, x.stderr).toBe(code);
        expect(x.stdout).toBe("");
        expect(x.stderr).toMatch(new RegExp(`^rexmesh: ${re.source}[^\\n]*\\n$`));
      };
      oneLine(await rexmesh(["dev", "restart", "proxy-nowhere", "--dir", dir]), 1, /no role named "proxy-nowhere" in this mesh/);
      oneLine(await rexmesh(["dev", "kill", "--dir", dir]), 2, /rexmesh dev kill needs one role/);
      oneLine(await rexmesh(["dev", "kill", "controller", "--signal", "HUP", "--dir", dir]), 2, /--signal "HUP": use one of SIGKILL, SIGTERM, SIGINT/);
      oneLine(await rexmesh(["dev", "--hosts", "2", "--dir", dir]), 1, /a dev mesh is already running in /);
    } finally {
      dev.proc.kill("SIGINT");
    }
    expect(await dev.exited).toBe(0);
    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
    expect(existsSync(join(dir, "control.json"))).toBe(false);
  });

  it("says in one line that no mesh runs in a directory: none started there, or one that is gone", async () => {
    const oneLine = (x: { code: number; stdout: string; stderr: string }, re: RegExp) => {
      expect(x.code, x.stderr).toBe(1);
      expect(x.stderr).toMatch(new RegExp(`^rexmesh: ${re.source}[^\\n]*\\n$`));
    };
    const empty = tempDir("devnone");
    oneLine(await rexmesh(["dev", "roles", "--dir", empty]), /no dev mesh running in .*\(no control\.json there/);
    oneLine(await rexmesh(["dev", "restart", "controller", "--dir", empty]), /no dev mesh running in /);
    // A control file left by a dev that was killed: its port no longer answers.
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as { port: number }).port;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    writeFileSync(join(empty, "control.json"), JSON.stringify({ pid: 999_999, port, token: "x" }));
    oneLine(await rexmesh(["dev", "kill", "controller", "--dir", empty]), /no dev mesh running in .*which is gone\)/);
  });
});
