/**
 * Idle host links carry an application frame only every few heartbeats
 * (common/grpc-link.ts IDLE_FRAME_INTERVALS); whether a peer is alive is
 * asked every heartbeat with an HTTP/2 PING. What must not change is how
 * soon a silent peer is noticed: a daemon behind a link that goes silent
 * (no reset, no close: a cable pulled, a firewall dropping packets) is
 * dropped by its proxy, and fails over to the next proxy of its region,
 * within about three heartbeats, not within the application heartbeat's
 * much later backstop.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh, REXMESH_BIN, type RoleProcess } from "../../cli/launcher.js";
import { IDLE_FRAME_INTERVALS } from "../../common/grpc-link.js";
import { ConnectionState } from "../../gen/rexmesh/v1/controller_pb.js";
import { clientOf, SilentCut, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

const HEARTBEAT_MS = 1000;

describe("idle host links: a silent peer is noticed within three heartbeats", () => {
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("idle-links"),
    regions: ["r"],
    hosts: [],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  let second: RoleProcess & { address?: string };
  let relay: SilentCut;
  let daemon: ChildProcess | undefined;
  let conn: ReturnType<typeof clientOf>;
  const where = async () => (await conn.client.listHosts({})).hosts.find((x) => x.id === "roamer");

  beforeAll(async () => {
    await mesh.start();
    second = await mesh.startExtraProxy("r", "proxy-r-2");
    // The daemon reaches the first proxy through a relay that can go silent, the second directly.
    relay = await SilentCut.start(mesh.proxies[0]!.address!);
    const h = mesh.issue({ role: "host", scope: "default", id: "roamer" }, join(mesh.dir, "roamer"));
    daemon = spawn(
      process.execPath,
      [REXMESH_BIN, "daemon", "--proxies", `${relay.address},${second.address}`, "--cert", h.cert, "--key", h.key, "--ca", h.ca, "--data", join(mesh.dir, "data", "roamer"), "--heartbeat", "1s"],
      { stdio: ["ignore", "ignore", "ignore"] },
    );
    conn = clientOf(mesh);
    await until("roamer connected through the first proxy", async () => {
      const h = await where();
      return h?.connection === ConnectionState.CONNECTED && h.proxy === mesh.proxies[0]!.name ? h : undefined;
    });
  }, 120_000);

  afterAll(async () => {
    conn?.close();
    daemon?.kill("SIGKILL");
    relay?.close();
    await mesh.stop();
  });

  it("a link gone silent both ways: the proxy lets the host go and the host is back through the other proxy, both well before the idle frames' backstop", async () => {
    // Idle for a while first: the link must stay up on PINGs alone (no application frame for IDLE_FRAME_INTERVALS heartbeats).
    await new Promise((r) => setTimeout(r, 3 * HEARTBEAT_MS));
    expect((await where())?.proxy).toBe(mesh.proxies[0]!.name);
    const cutAt = Date.now();
    relay.stop();
    const moved = await until(
      "roamer reconnected through the second proxy",
      async () => {
        const h = await where();
        return h?.connection === ConnectionState.CONNECTED && h.proxy === "proxy-r-2" ? h : undefined;
      },
      30_000,
    );
    const tookMs = Date.now() - cutAt;
    expect(moved.proxy).toBe("proxy-r-2");
    // PING every heartbeat, dropped when unanswered for 2 more: about 3 heartbeats (plus a reconnect). The application
    // heartbeat alone would have taken 3 × IDLE_FRAME_INTERVALS heartbeats (36 s here).
    const backstopMs = 3 * IDLE_FRAME_INTERVALS * HEARTBEAT_MS;
    // Within a bound of its own, not a share of the backstop (which grows with the idle frames' pace).
    const noticedWithinMs = 9 * HEARTBEAT_MS;
    expect(noticedWithinMs).toBeLessThan(backstopMs / 2);
    expect(tookMs).toBeLessThan(noticedWithinMs);
    // The first proxy noticed too (its PINGs went unanswered), rather than holding a dead stream until the backstop.
    const dropped = await until(
      "the first proxy let roamer go",
      async () => (readFileSync(mesh.proxies[0]!.logFile, "utf8").split("\n").some((l) => l.includes("host disconnected") && l.includes("roamer")) ? Date.now() - cutAt : undefined),
      30_000,
    );
    expect(dropped).toBeLessThan(noticedWithinMs);
    relay.restore();
  }, 60_000);
});
