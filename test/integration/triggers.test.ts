import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { readCredentials } from "../../certs/files.js";
import type { PeerIdentity } from "../../certs/identity.js";
import { AsyncQueue } from "../../common/async-queue.js";
import { systemClock } from "../../common/clock.js";
import { HostReporter } from "../../common/host-signing.js";
import { HostEventSchema } from "../../gen/rexmesh/v1/event_pb.js";
import { ProxyLinkService, ProxyStreamRequestSchema, type ProxyStreamRequest } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { operatorChannel } from "../../cli/client.js";
import { clientFor, openChannel } from "../../common/connect-dial.js";
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

  it("keeps events and the trigger's cooldown across a controller killed with SIGKILL: a new failure within the cooldown queues no job, nothing is taken twice", async () => {
    await mesh.kill(mesh.controller, "SIGKILL");
    await mesh.restart(mesh.controller);
    await mesh.waitForHosts(1);
    const conn = clientOf(mesh);
    const channel = operatorChannel({}, mesh.exports());
    const triggers = clientFor(TriggerService, channel);
    try {
      const before = (await triggers.listEvents({ pageSize: 100 })).events;
      expect(before).toHaveLength(3);
      const jobs = (await conn.client.listJobs({})).jobs.map((j) => j.id);
      expect(jobs).toHaveLength(1);
      rmSync(flag);
      await seen("the recovery noticed");
      writeFileSync(flag, "");
      await seen("the third failure noticed");
      const after = await until(
        "the new events evaluated",
        async () => {
          const { events } = await triggers.listEvents({ pageSize: 100 });
          return events.length >= 5 && events.every((e) => e.evaluated) ? events : undefined;
        },
        60_000,
      );
      expect(after).toHaveLength(5);
      expect(after[0]!.event!.kind).toBe("service.failed");
      expect(after[0]!.outcomes).toEqual([expect.objectContaining({ trigger: "fix-web", jobId: "", note: expect.stringMatching(/^suppressed: cooldown/) })]);
      expect((await conn.client.listJobs({})).jobs.map((j) => j.id)).toEqual(jobs);
    } finally {
      channel.close();
      conn.close();
    }
  }, 120_000);

  it("a proxy cannot make an event up: one unsigned, or signed by another host's key, is dropped at the controller and queues no job", async () => {
    const conn = clientOf(mesh);
    const channel = operatorChannel({}, mesh.exports());
    const triggers = clientFor(TriggerService, channel);
    // A proxy of the region with a valid certificate (or whoever holds one) opens its own link.
    const rogue = readCredentials(mesh.issue({ role: "proxy", scope: "dc", id: "px-rogue" }, join(mesh.dir, "rogue"), true));
    const link = openChannel(mesh.controllerAddress, rogue, ["controller"]);
    const out = new AsyncQueue<ProxyStreamRequest>();
    try {
      const before = { events: (await triggers.listEvents({ pageSize: 100 })).events.length, jobs: (await conn.client.listJobs({})).jobs.length };
      // A host's key it stole would be another host's: w2's, endorsed by w2's certificate.
      const w2: PeerIdentity = { role: "host", scope: "default", id: "w2" };
      const stolen = new HostReporter(readCredentials(mesh.issue(w2, join(mesh.dir, "rogue"))), systemClock, w2);
      const forged = (id: string) => create(HostEventSchema, { id, hostId: "w1", tenant: "default", kind: "service.failed", details: { unit: "web.service" }, time: timestampFromMs(Date.now()), watcher: "web" });
      const unsigned = forged("e-forged-1");
      const otherKey = forged("e-forged-2");
      stolen.signEvent(otherKey);
      otherKey.reportKey = stolen.key;
      out.push(create(ProxyStreamRequestSchema, { hello: { name: "px-rogue", region: "dc", heartbeatMs: 10_000 } }));
      out.push(create(ProxyStreamRequestSchema, { events: [unsigned, otherKey] }));
      const acked: string[] = [];
      for await (const frame of clientFor(ProxyLinkService, link).proxyStream(out)) {
        acked.push(...frame.eventAcks.map((a) => a.eventId));
        if (acked.length >= 2) break;
      }
      // Acknowledged (the proxy may forget them), never stored, never evaluated.
      expect(acked.sort()).toEqual(["e-forged-1", "e-forged-2"]);
      expect((await triggers.listEvents({ pageSize: 100 })).events.length).toBe(before.events);
      expect((await conn.client.listJobs({})).jobs.length).toBe(before.jobs);
      expect(readFileSync(mesh.controller.logFile, "utf8")).toMatch(/an event whose host signature does not hold was dropped/);
    } finally {
      out.close();
      link.close();
      channel.close();
      conn.close();
    }
  }, 60_000);

  it("rexmesh --help lists triggers and events with an example", async () => {
    const help = (await rexmesh(["--help"])).stdout;
    expect(help).toMatch(/^ {2}triggers +jobs queued when a host reports an event/m);
    expect(help).toMatch(/^ {2}events +events hosts' watchers reported/m);
    expect(help).toContain("triggers add fix-nginx --on 'kind=service.failed and unit=nginx.service'");
    expect((await rexmesh(["triggers", "--help"])).stdout).toContain("rexmesh triggers add restart-nginx --on");
    expect((await rexmesh(["events", "--help"])).stdout).toContain("rexmesh events --kind service.failed");
  });
});
