import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { ConnectionState, SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/** A region with two proxies: each task goes through the proxy that holds its host's stream now. */
describe("proxy selection", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("routing"), regions: ["r"], hosts: [], daemonArgs: ["--heartbeat", "1s"], proxyArgs: ["--heartbeat", "1s"] });
  let daemon: ChildProcess;

  beforeAll(async () => {
    await mesh.start();
    const second = await mesh.startExtraProxy("r", "proxy-r-2");
    const h = mesh.issue({ role: "host", scope: "default", id: "mover" }, join(mesh.dir, "mover"));
    // The host lists both proxies of its region; it starts on the first.
    daemon = spawn(process.execPath, [REXMESH_BIN, "daemon", "--proxies", `${mesh.proxies[0]!.address},${second.address}`, "--cert", h.cert, "--key", h.key, "--ca", h.ca, "--data", join(mesh.dir, "data", "mover"), "--heartbeat", "1s"], { stdio: "ignore" });
    await mesh.waitForHosts(1);
  });
  afterAll(async () => {
    daemon?.kill("SIGTERM");
    await mesh.stop();
  });

  const runOnce = async () => {
    const conn = clientOf(mesh);
    try {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["mover"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }));
      const r = await collectJob(conn.client, job!.id);
      const t = r.tasks.get("mover")!;
      expect(t.state).toBe(TaskState.SUCCEEDED);
      return t.proxy;
    } finally {
      conn.close();
    }
  };

  it("routes through the proxy holding the host, and re-routes when the host moves to another proxy of its region", async () => {
    expect(await runOnce()).toBe("proxy-r");
    // The first proxy goes away; the host moves to the second.
    const first = mesh.proxies[0]!;
    first.proc.kill("SIGKILL");
    await mesh.exited(first);
    const conn = clientOf(mesh);
    try {
      for (let i = 0; i < 200; i++) {
        const h = (await conn.client.listHosts({})).hosts.find((x) => x.id === "mover");
        if (h?.connection === ConnectionState.CONNECTED && h.proxy === "proxy-r-2") break;
        await new Promise((res) => setTimeout(res, 100));
      }
    } finally {
      conn.close();
    }
    expect(await runOnce()).toBe("proxy-r-2");
  });
});
