/**
 * The daemon's spawner (daemon/spawner.ts) killed while tasks run, in a
 * real mesh: the daemon notices, ends what is left of the tasks' processes,
 * reports each task INTERRUPTED with the reason (never left running, never
 * lost), and starts a new spawner for the next task.
 */
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { testCa } from "../test-ca.js";
import { clientOf, collectJob, isAlive, tempDir, until } from "./support.js";

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
});
