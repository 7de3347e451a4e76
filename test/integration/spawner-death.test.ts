/**
 * The daemon's spawner (daemon/spawner.ts) killed while tasks run, in a
 * real mesh: the daemon notices, ends what is left of the tasks' processes,
 * reports each task INTERRUPTED with the reason (never left running, never
 * lost), and starts a new spawner for the next task; a stopped (SIGSTOP)
 * spawner does not hold a timeout up. And a daemon whose
 * environment has a NODE_OPTIONS preload that writes to stdout runs a task
 * once (review F1: the stray line was read as a frame and the task ran twice).
 */
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { open } from "lmdb";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { LmdbLedger } from "../../daemon/lmdb-ledger.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { testCa } from "../test-ca.js";
import { clientOf, collectJob, isAlive, tempDir, until } from "./support.js";

/**
 * Whether the daemon has each task's process group in its ledger (what it
 * notes on the spawner's report of the start), read from its LMDB store,
 * which another process may read while it writes, by the daemon's own
 * ledger reader.
 */
async function groupsNoted(dataDir: string, tasks: { id: string; hostId: string }[]): Promise<boolean> {
  const root = open({ path: dataDir, readOnly: true, maxDbs: 32 });
  try {
    const db = root.openDB("ledger", { encoding: "msgpack" }) as ConstructorParameters<typeof LmdbLedger>[0];
    return tasks.every((t) => (new LmdbLedger(db, t.hostId).get(t.id)?.groups?.length ?? 0) > 0);
  } finally {
    await root.close();
  }
}

/** The spawner of a daemon process: its child running spawner-main.js. */
function spawnerOf(daemonPid: number): number | undefined {
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid !== daemonPid) continue;
      if (readFileSync(`/proc/${name}/cmdline`, "utf8").includes("spawner-main.js")) return Number(name);
    } catch {
      // gone
    }
  }
  return undefined;
}

describe("a daemon's spawner dies while its tasks run", () => {
  const dir = tempDir("spawner-death");
  const hosts = ["s1", "s2"];
  const mesh = new LocalMesh({ ca: testCa(), dir, regions: ["r1"], hosts: hosts.map((id) => ({ id, region: "r1" })), hostsPerProcess: 2 });
  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(hosts.length);
  }, 120_000);
  afterAll(() => mesh.stop());

  it("ends the tasks INTERRUPTED with the reason, kills what they left running, and runs the next task through a new spawner", async () => {
    const { client, close } = clientOf(mesh);
    try {
      const daemonPid = mesh.daemons[0]!.proc.pid!;
      // Each task notes its pid, then writes a line and waits, ignoring SIGTERM (so only the SIGKILL after the grace ends it).
      const script = `echo $$ > "$MARK/$REXMESH_HOST_ID"; echo started; trap "" TERM; while :; do sleep 1; done`;
      const { job } = await client.submitJob({ hostIds: hosts, steps: [{ tool: { case: "shell", value: { script } } }], env: { MARK: dir } });
      const pids = await until("both tasks running", async () => {
        try {
          const p = hosts.map((h) => Number(readFileSync(join(dir, h), "utf8").trim()));
          return p.every((x) => x > 0) ? p : undefined;
        } catch {
          return undefined;
        }
      });
      // Killed once the daemon noted both groups (the spawner's report of each start read): killed before, the tasks end by the
      // other honest path ("… before it was known to have started"), as a loaded machine made happen here.
      const data = join(mesh.dir, "data", mesh.daemons[0]!.name);
      const { tasks } = await client.getJob({ jobId: job!.id });
      expect(tasks).toHaveLength(hosts.length);
      await until("the daemon has both tasks' process groups", async () => ((await groupsNoted(data, tasks)) ? true : undefined));
      const spawner = spawnerOf(daemonPid);
      expect(spawner, "the daemon runs its tasks through a spawner").toBeDefined();
      process.kill(spawner!, "SIGKILL");

      const r = await collectJob(client, job!.id, AbortSignal.timeout(30_000));
      for (const h of hosts) {
        const t = r.tasks.get(h)!;
        expect(t.state, `${h}: ${t.message}`).toBe(TaskState.INTERRUPTED);
        expect(t.message).toMatch(/spawner was killed by SIGKILL while its process \d+ ran: its exit and any output not yet received are unknown; \d+ leftover process(es)? ended/);
        expect(t.outputTruncated).toBe(true);
      }
      // Nothing of them runs on (the shell ignored SIGTERM; its sleep did not).
      for (const pid of pids) await until(`process ${pid} gone`, async () => (isAlive(pid) ? undefined : true), 10_000);
      expect(isAlive(daemonPid)).toBe(true);

      const again = await client.submitJob({ hostIds: hosts, steps: [{ tool: { case: "exec", value: { argv: ["echo", "again"] } } }] });
      const r2 = await collectJob(client, again.job!.id, AbortSignal.timeout(30_000));
      for (const h of hosts) {
        expect(r2.tasks.get(h)!.state, r2.tasks.get(h)!.message).toBe(TaskState.SUCCEEDED);
        expect(r2.stdout.get(h)!.toString()).toBe("again\n");
      }
      const next = spawnerOf(daemonPid);
      expect(next).toBeDefined();
      expect(next).not.toBe(spawner);
    } finally {
      close();
    }
  }, 90_000);

  it("times tasks out within seconds while their spawner is stopped (SIGSTOP), and nothing changes when it runs again", async () => {
    const { client, close } = clientOf(mesh);
    const daemonPid = mesh.daemons[0]!.proc.pid!;
    const spawner = spawnerOf(daemonPid)!;
    let stopped = false;
    try {
      const script = `echo $$ > "$MARK/$REXMESH_HOST_ID.stalled"; echo started; exec sleep 60`;
      const { job } = await client.submitJob({ hostIds: hosts, steps: [{ tool: { case: "shell", value: { script } } }], env: { MARK: dir }, timeout: durationFromMs(4000) });
      const pids = await until("both tasks running", async () => {
        try {
          const p = hosts.map((h) => Number(readFileSync(join(dir, `${h}.stalled`), "utf8").trim()));
          return p.every((x) => x > 0) ? p : undefined;
        } catch {
          return undefined;
        }
      });
      // The spawner reports each start (SPAWNED) after the shell exists: stopped before the daemon has it, the task would end by
      // the other honest path ("did not report its start"). Stopped once the daemon noted both groups, it is the timeout's.
      const data = join(mesh.dir, "data", mesh.daemons[0]!.name);
      const { tasks } = await client.getJob({ jobId: job!.id });
      await until("the daemon has both tasks' process groups", async () => ((await groupsNoted(data, tasks)) ? true : undefined));
      process.kill(spawner, "SIGSTOP");
      stopped = true;
      const t0 = Date.now();
      const r = await collectJob(client, job!.id, AbortSignal.timeout(60_000));
      expect(Date.now() - t0, "ended by the daemon, not after the spawner's 30 s watchdog").toBeLessThan(20_000);
      for (const h of hosts) {
        const t = r.tasks.get(h)!;
        expect(t.state, `${h}: ${t.message}`).toBe(TaskState.TIMED_OUT);
        expect(t.message).toMatch(/^timed out after 4s; no end of its process \d+ was reported 5s after its group was gone \(the spawner did not answer\)/);
        expect(t.outputTruncated).toBe(true);
      }
      for (const pid of pids) expect(isAlive(pid), `process ${pid} was ended`).toBe(false);

      process.kill(spawner, "SIGCONT");
      stopped = false;
      const again = await client.submitJob({ hostIds: hosts, steps: [{ tool: { case: "exec", value: { argv: ["echo", "again"] } } }] });
      const r2 = await collectJob(client, again.job!.id, AbortSignal.timeout(30_000));
      for (const h of hosts) expect(r2.tasks.get(h)!.state, r2.tasks.get(h)!.message).toBe(TaskState.SUCCEEDED);
      // The same spawner (not killed by its watchdog), and the stopped tasks' ends as they were.
      expect(spawnerOf(daemonPid)).toBe(spawner);
      const r3 = await collectJob(client, job!.id, AbortSignal.timeout(30_000));
      for (const h of hosts) {
        const [before, after] = [r.tasks.get(h)!, r3.tasks.get(h)!];
        expect([after.state, after.message, after.outputTruncated]).toEqual([before.state, before.message, before.outputTruncated]);
        expect(r3.stdout.get(h)?.toString()).toBe(r.stdout.get(h)?.toString());
      }
    } finally {
      if (stopped && isAlive(spawner)) process.kill(spawner, "SIGCONT");
      close();
    }
  }, 120_000);
});

describe("a daemon started with a NODE_OPTIONS preload that writes one line to stdout", () => {
  const dir = tempDir("spawner-nodeopts");
  const preload = join(tempDir("spawner-preload"), "preload.cjs");
  writeFileSync(preload, `process.stdout.write("preload: agent started\\n");\n`);
  const mesh = new LocalMesh({ ca: testCa(), dir, regions: ["r1"], hosts: [{ id: "n1", region: "r1" }] });
  beforeAll(async () => {
    mesh.prepare();
    await mesh.startController();
    await mesh.startProxies();
    const saved = process.env.NODE_OPTIONS;
    process.env.NODE_OPTIONS = `--require ${preload}`;
    try {
      await mesh.startDaemons();
    } finally {
      if (saved === undefined) delete process.env.NODE_OPTIONS;
      else process.env.NODE_OPTIONS = saved;
    }
    await mesh.waitForHosts(1);
  }, 120_000);
  afterAll(() => mesh.stop());

  it("runs a task once, through its spawner", async () => {
    const { client, close } = clientOf(mesh);
    try {
      const runs = join(mesh.dir, "runs");
      const script = `echo "$REXMESH_TASK_ID pid $$ ppid $PPID" >> "$RUNS"; echo hello`;
      const { job } = await client.submitJob({ hostIds: ["n1"], steps: [{ tool: { case: "shell", value: { script } } }], env: { RUNS: runs } });
      const r = await collectJob(client, job!.id, AbortSignal.timeout(100_000));
      const t = r.tasks.get("n1")!;
      expect(t.state, t.message).toBe(TaskState.SUCCEEDED);
      expect(r.stdout.get("n1")?.toString()).toBe("hello\n");
      const lines = existsSync(runs) ? readFileSync(runs, "utf8").trim().split("\n") : [];
      expect(lines, "the task's process was started this many times").toHaveLength(1);
      // Started by the spawner, not by the daemon falling back.
      const daemon = mesh.daemons[0]!.proc.pid!;
      expect(Number(lines[0]!.split(" ").at(-1))).toBe(spawnerOf(daemon));
    } finally {
      close();
    }
  }, 120_000);
});
