import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { operatorChannel } from "../../cli/client.js";
import { clientFor } from "../../common/connect-dial.js";
import { ConnectionState } from "../../gen/rexmesh/v1/controller_pb.js";
import { TriggerService, type StoredEvent } from "../../gen/rexmesh/v1/trigger_pb.js";
import { testCa } from "../test-ca.js";
import { clientOf, collectJob, rexmesh, SilentCut, tempDir, until } from "./support.js";

/**
 * Events and triggers end to end (docs/triggers.md), with real processes:
 * a daemon's service watcher (a command standing in for `systemctl
 * is-active`, whose exit code the test flips with a flag file) notices the
 * service fail — and fail again after a flap — while its proxy is cut off
 * from the controller. When the link returns, the events arrive once each,
 * and the trigger queues exactly one job, which runs on that host; the
 * second failure, within the cooldown, queues none.
 */
describe("triggers: an event noticed while the proxy is cut off", () => {
  const dir = tempDir("triggers");
  const watchFile = join(dir, "watch.yaml");
  const mesh = new LocalMesh({
    ca: testCa(),
    dir,
    regions: ["dc"],
    hosts: [{ id: "w1", region: "dc" }],
    daemonArgs: ["--heartbeat", "1s", "--watch", watchFile],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  const flag = join(mesh.dir, "web-failed");
  const polls = join(mesh.dir, "polls");
  let relay: SilentCut;

  beforeAll(async () => {
    mesh.prepare();
    // Each poll leaves a line, so the test waits on polls, not on time.
    writeFileSync(
      watchFile,
      `watchers:\n  - name: web\n    kind: service\n    unit: web.service\n    every: 1s\n    command: [sh, -c, 'echo . >> "${polls}"; test ! -e "${flag}"']\n`,
    );
    await mesh.startController();
    relay = await SilentCut.start(mesh.controllerAddress);
    mesh.controllerAddressForProxies = relay.address;
    await mesh.startProxies();
    await mesh.startDaemons();
    await mesh.waitForHosts(1);
  }, 120_000);
  afterAll(async () => {
    relay?.close();
    await mesh.stop();
  });

  const pollCount = () => (existsSync(polls) ? readFileSync(polls, "utf8").length / 2 : 0);
  /** Waits until the watcher has polled twice more: the state set now has been seen. */
  const seen = async (what: string) => {
    const from = pollCount();
    await until(what, async () => (pollCount() >= from + 2 ? true : undefined), 30_000);
  };

  it("queues exactly one job on the reporting host once the link returns; the flap within the cooldown queues none", async () => {
    const conn = clientOf(mesh);
    const channel = operatorChannel({}, mesh.exports());
    const triggers = clientFor(TriggerService, channel);
    try {
      const added = await rexmesh(
        ["triggers", "add", "fix-web", "--on", "kind=service.failed and unit=web.service", "--cooldown", "10m", "--max-per-host", "5/1h", "--", "sh", "-c", "echo restarted-by-trigger"],
        mesh.exports(),
      );
      expect(added.stderr).toBe("");
      expect(added.stdout).toBe("fix-web: on kind=service.failed and unit=web.service\n");
      const bad = await rexmesh(["triggers", "add", "broken", "--on", "kind=service.failed or unit=x", "--", "true"], mesh.exports());
      expect(bad.stderr).toMatch(/InvalidArgument: match expression .*expected 'and' at column 21/);
      await seen("the watcher running");

      relay.stop();
      await until("the cut noticed", async () => ((await conn.client.listHosts({})).hosts.every((h) => h.connection !== ConnectionState.CONNECTED) ? true : undefined), 30_000);
      // Fails, recovers, fails again: two service.failed events (and a service.recovered), all while cut off.
      writeFileSync(flag, "");
      await seen("the failure noticed");
      rmSync(flag);
      await seen("the recovery noticed");
      writeFileSync(flag, "");
      await seen("the second failure noticed");
      // Nothing has reached the controller: no event, no job.
      expect((await triggers.listEvents({})).events).toEqual([]);
      expect((await conn.client.listJobs({})).jobs).toEqual([]);

      relay.restore();
      const failed = await until(
        "both failures evaluated at the controller",
        async () => {
          const { events } = await triggers.listEvents({ kind: "service.failed" });
          return events.length >= 2 && events.every((e) => e.evaluated) ? events : undefined;
        },
        60_000,
      );
      // Exactly once each: two failures, one recovery, no copies.
      const all = (await triggers.listEvents({ pageSize: 100 })).events;
      expect(all.map((e) => e.event!.kind).sort()).toEqual(["service.failed", "service.failed", "service.recovered"]);
      expect(new Set(all.map((e) => e.event!.id)).size).toBe(3);
      for (const e of all) expect(e.event!.hostId).toBe("w1");
      // Oldest first: the first failure fired the trigger, the second was held back by the cooldown.
      const [first, second] = [...failed].reverse() as [StoredEvent, StoredEvent];
      expect(first.outcomes).toHaveLength(1);
      expect(first.outcomes[0]!.trigger).toBe("fix-web");
      const jobId = first.outcomes[0]!.jobId;
      expect(jobId).not.toBe("");
      expect(second.outcomes).toEqual([expect.objectContaining({ trigger: "fix-web", jobId: "", note: expect.stringMatching(/^suppressed: cooldown \(job /) })]);
      expect(first.event!.details).toMatchObject({ unit: "web.service" });

      const result = await collectJob(conn.client, jobId);
      expect([...result.tasks.keys()]).toEqual(["w1"]);
      expect(result.stdout.get("w1")?.toString()).toBe("restarted-by-trigger\n");
      expect(result.job.submittedBy).toBe("dev");

      // Still one job after more polls (nothing re-sent is taken again), and the trigger says why.
      await seen("more polls after the link returned");
      expect((await conn.client.listJobs({})).jobs.map((j) => j.id)).toEqual([jobId]);
      const shown = JSON.parse((await rexmesh(["triggers", "show", "fix-web", "--json"], mesh.exports())).stdout) as { fired: number; suppressed: number };
      expect(shown).toMatchObject({ fired: 1, suppressed: 1 });
      const listed = JSON.parse((await rexmesh(["events", "--kind", "service.failed", "--json"], mesh.exports())).stdout) as { outcomes: { jobId: string }[] }[];
      expect(listed.map((e) => e.outcomes[0]!.jobId)).toEqual(["", jobId]);
    } finally {
      channel.close();
      conn.close();
    }
  }, 180_000);
});
