import { spawn, type ChildProcess } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/** Short-lived host certificates are renewed over the link, mid-job, without losing a byte. */
describe("certificate renewal", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("renew"), regions: ["r"], hosts: [], controllerArgs: ["--host-cert-ttl", "60s"] });
  let daemon: ChildProcess;
  let certPath: string;
  let log = "";

  beforeAll(async () => {
    await mesh.start();
    // A host whose certificate ends 40 s from now; it renews 30 s before expiry.
    const paths = mesh.issue({ role: "host", scope: "default", id: "n1" }, join(mesh.dir, "n1"), false, 40_000);
    certPath = paths.cert;
    daemon = spawn(
      process.execPath,
      [REXMESH_BIN, "daemon", "--proxies", mesh.proxies[0]!.address!, "--cert", paths.cert, "--key", paths.key, "--ca", paths.ca, "--data", join(mesh.dir, "data", "n1"), "--renew-before", "30s"],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
    daemon.stderr!.on("data", (d) => (log += d));
    await mesh.waitForHosts(1);
  });

  afterAll(async () => {
    daemon?.kill("SIGTERM");
    await mesh.stop();
  });

  it("renews the certificate during a running job, and every output byte arrives", async () => {
    const before = new X509Certificate(readFileSync(certPath));
    const conn = clientOf(mesh);
    try {
      // 150 lines over about 15 s: the renewal (about 10 s after start) happens in the middle.
      const script = "i=1; while [ $i -le 150 ]; do echo line-$i; i=$((i+1)); sleep 0.1; done";
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["n1"], steps: [{ tool: { case: "shell", value: { script } } }] }));
      const r = await collectJob(conn.client, job!.id);
      expect(r.tasks.get("n1")!.state).toBe(TaskState.SUCCEEDED);
      expect(r.stdout.get("n1")!.toString()).toBe(Array.from({ length: 150 }, (_, i) => `line-${i + 1}\n`).join(""));
      const after = new X509Certificate(readFileSync(certPath));
      expect(after.serialNumber).not.toBe(before.serialNumber);
      expect(Date.parse(after.validTo)).toBeGreaterThan(Date.parse(before.validTo));
      expect(after.subjectAltName).toContain("URI:rexmesh://host/default/n1");
      expect(log).toMatch(/host certificate renewed/);
      // The renewed certificate works: a new connection is made with it.
      expect((await conn.client.listHosts({})).hosts.find((h) => h.id === "n1")?.connection).toBe(1);
    } finally {
      conn.close();
    }
  }, 90_000);
});
