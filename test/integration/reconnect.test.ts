import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { LocalMesh } from "../../cli/launcher.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

const echoHost = create(SubmitJobRequestSchema, { allHosts: true, steps: [{ tool: { case: "shell", value: { script: 'echo "$REXMESH_HOST_ID"' } } }] });

/** Links come back by themselves after a peer dies: daemons and proxies redial with backoff. */
describe("reconnects", () => {
  const hosts = ["r1", "r2", "r3", "r4"];
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("reconnect"),
    regions: ["east"],
    hosts: hosts.map((id) => ({ id, region: "east" })),
    hostsPerProcess: 2,
    daemonArgs: ["--heartbeat", "1s"],
    proxyArgs: ["--heartbeat", "1s"],
    controllerArgs: ["--heartbeat", "1s"],
  });

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(hosts.length);
  });
  afterAll(() => mesh.stop());

  async function runEverywhere(): Promise<void> {
    const conn = clientOf(mesh);
    try {
      const { job } = await conn.client.submitJob(echoHost);
      const r = await collectJob(conn.client, job!.id);
      for (const h of hosts) {
        expect(r.tasks.get(h)?.state, h).toBe(TaskState.SUCCEEDED);
        expect(r.stdout.get(h)?.toString(), h).toBe(`${h}\n`);
      }
    } finally {
      conn.close();
    }
  }

  it("daemons return after their proxy is killed with SIGKILL and restarted", async () => {
    const proxy = mesh.proxies[0]!;
    proxy.proc.kill("SIGKILL");
    await mesh.exited(proxy);
    await mesh.restart(proxy);
    await mesh.waitForHosts(hosts.length);
    await runEverywhere();
  });

  it("the proxy returns, with its hosts, after the controller is killed and restarted", async () => {
    mesh.controller.proc.kill("SIGKILL");
    await mesh.exited(mesh.controller);
    await mesh.restart(mesh.controller);
    await mesh.waitForHosts(hosts.length);
    await runEverywhere();
  });

  it("a daemon fails over to the next proxy of its list", async () => {
    // A listed proxy that refuses connections comes first; the daemon moves on to the live one.
    const extra = mesh.issue({ role: "host", scope: "default", id: "r5" }, `${mesh.dir}/hosts/extra`);
    const { spawn } = await import("node:child_process");
    const { REXMESH_BIN } = await import("../../cli/launcher.js");
    const dead = "127.0.0.1:1"; // nothing listens on port 1
    const proc = spawn(process.execPath, [REXMESH_BIN, "daemon", "--proxies", `${dead},${mesh.proxies[0]!.address}`, "--cert", extra.cert, "--key", extra.key, "--ca", extra.ca, "--data", `${mesh.dir}/data/extra`], { stdio: "ignore" });
    try {
      await mesh.waitForHosts(hosts.length + 1);
      const conn = clientOf(mesh);
      const { hosts: listed } = await conn.client.listHosts({});
      conn.close();
      expect(listed.find((h) => h.id === "r5")?.proxy).toBe("proxy-east");
    } finally {
      proc.kill("SIGTERM");
    }
  });
});
