import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { LocalMesh } from "../../cli/launcher.js";
import { operatorClient } from "../../cli/client.js";
import { ConnectionState } from "../../gen/rexmesh/v1/controller_pb.js";
import { clientOf, rexmesh, SilentCut, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

describe("revocation", () => {
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("revoke"),
    regions: ["a", "b"],
    hosts: [
      { id: "a1", region: "a" },
      { id: "a2", region: "a" },
      { id: "b1", region: "b" },
      { id: "b2", region: "b" },
    ],
    daemonArgs: ["--heartbeat", "1s"],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  let relay: SilentCut;

  beforeAll(async () => {
    mesh.prepare();
    await mesh.startController();
    relay = await SilentCut.start(mesh.controllerAddress);
    // Both proxies reach the controller through a link the test can cut.
    mesh.controllerAddressForProxies = relay.address;
    await mesh.startProxies();
    await mesh.startDaemons();
    await mesh.waitForHosts(4);
  }, 60_000);
  afterAll(async () => {
    relay?.close();
    await mesh.stop();
  });

  const states = async () => {
    const conn = clientOf(mesh);
    try {
      return Object.fromEntries((await conn.client.listHosts({})).hosts.map((h) => [h.id, h.connection === ConnectionState.CONNECTED]));
    } finally {
      conn.close();
    }
  };
  const until = async (what: string, check: () => Promise<boolean>, ms: number) => {
    const end = Date.now() + ms;
    while (!(await check())) {
      if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };

  it("closes a revoked host's open stream within 5 s, and its reconnects fail", async () => {
    const r = await rexmesh(["hosts", "revoke", "a1", "--reason", "test"], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const revokedAt = Date.now();
    await until("a1 disconnected", async () => (await states()).a1 === false, 5000);
    expect(Date.now() - revokedAt).toBeLessThan(5000);
    // The daemon keeps trying (backoff from 1 s); every attempt is refused.
    await new Promise((res) => setTimeout(res, 3000));
    const s = await states();
    expect(s.a1).toBe(false);
    expect(s.a2).toBe(true);
    // Audited: who revoked what, and why.
    const audit = await rexmesh(["audit", "--json"], mesh.exports());
    expect(audit.code, audit.stderr).toBe(0);
    const events = audit.stdout.trim().split("\n").map((l) => JSON.parse(l) as { kind: string; what?: string; reason?: string; actor: string });
    expect(events.find((e) => e.kind === "revoke" && e.what === "rexmesh://host/default/a1")).toMatchObject({ reason: expect.stringMatching(/reason given: test$/), actor: "operator:default/dev" });
  });

  it("a proxy cut off during the revocation enforces it as soon as it reconnects", async () => {
    // The whole edge is cut off from the controller while b1 is revoked.
    relay.stop();
    await until("region b cut off", async () => {
      const s = await states();
      return s.b1 === false && s.b2 === false;
    }, 30_000);
    expect((await rexmesh(["hosts", "revoke", "b1"], mesh.exports())).code).toBe(0);
    relay.restore();
    await until("region b back", async () => (await states()).b2 === true, 30_000);
    const back = Date.now();
    await until("b1 refused by its proxy", async () => (await states()).b1 === false, 5000);
    expect(Date.now() - back).toBeLessThan(5000);
    await new Promise((res) => setTimeout(res, 3000));
    expect((await states()).b1).toBe(false);
  });

  it("refuses a revoked operator on every call", async () => {
    const eve = mesh.issue({ role: "operator", scope: "default", id: "eve" }, join(mesh.dir, "eve"));
    const env = { REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: eve.cert, REXMESH_KEY: eve.key, REXMESH_CA: eve.ca };
    const conn = operatorClient({}, env);
    try {
      expect((await conn.client.listHosts({})).hosts.length).toBe(4);
      expect((await rexmesh(["operators", "revoke", "eve"], mesh.exports())).code).toBe(0);
      const err = await conn.client.listHosts({}).catch((e) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.PermissionDenied);
      expect((err as ConnectError).rawMessage).toMatch(/revoked/);
    } finally {
      conn.close();
    }
  });
});
