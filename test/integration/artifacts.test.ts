import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { LocalMesh } from "../../cli/launcher.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState, type Step } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, hostIds, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * The artifact repository end to end: 20 hosts (two daemon processes of ten)
 * behind one proxy, real processes over mTLS.
 */
describe("artifact repository", () => {
  const hosts = hostIds(20);
  const dir = tempDir("artifacts");
  const mesh = new LocalMesh({ ca: testCa(), dir, regions: ["dc1"], hosts: hosts.map((id) => ({ id, region: "dc1" })), hostsPerProcess: 10, shareHostKey: true });
  let conn: ReturnType<typeof clientOf>;
  const work = tempDir("artifacts-work");
  const controllerBlob = (digest: string) => join(mesh.dir, "data", "controller", "artifacts", "sha256", digest.slice(7));
  const proxyBlobs = () => join(mesh.dir, "data", "proxy-dc1", "artifacts", "sha256");
  /** Controller-side downloads of one artifact, from the controller's structured log. */
  const servedCount = (digest: string) =>
    readFileSync(mesh.controller.logFile, "utf8")
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { msg?: string; digest?: string })
      .filter((e) => e.msg === "artifact served" && e.digest === digest).length;
  /** Misses the proxy sent to the controller for one artifact, from the proxy's log. */
  const proxyFetches = (digest: string) =>
    readFileSync(mesh.proxies[0]!.logFile, "utf8")
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { msg?: string; digest?: string })
      .filter((e) => e.msg === "fetching artifact from the controller" && e.digest === digest).length;

  async function put(name: string, content: string | Buffer): Promise<string> {
    const file = join(work, name);
    writeFileSync(file, content);
    const r = await rexmesh(["artifacts", "put", file], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const digest = r.stdout.trim();
    expect(digest).toBe(`sha256:${createHash("sha256").update(content).digest("hex")}`);
    return digest;
  }

  async function runSteps(steps: Step[], hostIdsToRun?: string[]) {
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, hostIdsToRun ? { hostIds: hostIdsToRun, steps } : { allHosts: true, steps }));
    return collectJob(conn.client, job!.id);
  }

  const scriptStep = (artifact: string, args: string[] = []): Step => ({ $typeName: "rexmesh.v1.Step", name: "", tool: { case: "script", value: { $typeName: "rexmesh.v1.ScriptTool", artifact, interpreter: [], args } } });

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(hosts.length);
    conn = clientOf(mesh);
  });

  afterAll(async () => {
    conn?.close();
    await mesh.stop();
  });

  it("an artifact used by 20 hosts behind one proxy is fetched from the controller once", async () => {
    const digest = await put("hello.sh", 'echo "hello from $REXMESH_HOST_ID with $1"\n');
    const r = await runSteps([scriptStep(digest, ["arg-1"])]);
    expect(r.tasks.size).toBe(20);
    for (const h of hosts) {
      expect(r.tasks.get(h)!.state, `${h}: ${r.tasks.get(h)!.message}`).toBe(TaskState.SUCCEEDED);
      expect(r.stdout.get(h)?.toString()).toBe(`hello from ${h} with arg-1\n`);
    }
    expect(servedCount(digest)).toBe(1);
    expect(proxyFetches(digest)).toBe(1);
    expect(readdirSync(proxyBlobs()).filter((f) => f === digest.slice(7))).toHaveLength(1);
    // A second job is served from the proxy's disk cache.
    const again = await runSteps([scriptStep(digest, ["arg-2"])]);
    for (const h of hosts) expect(again.tasks.get(h)!.state).toBe(TaskState.SUCCEEDED);
    expect(servedCount(digest)).toBe(1);
  });

  it("refuses an artifact corrupted at the controller: FAILED naming the digest, never cached by the proxy", async () => {
    const digest = await put("victim.sh", "echo fine\n");
    writeFileSync(controllerBlob(digest), "echo corrupted\n");
    const r = await runSteps([scriptStep(digest)], ["h01", "h12"]);
    for (const h of ["h01", "h12"]) {
      const t = r.tasks.get(h)!;
      expect(t.state).toBe(TaskState.FAILED);
      expect(t.message).toContain(digest);
      expect(r.stdout.get(h)).toBeUndefined();
    }
    expect(existsSync(join(proxyBlobs(), digest.slice(7)))).toBe(false);
  });

  it("refuses an artifact corrupted in the proxy's cache: the daemon checks the digest before use", async () => {
    const digest = await put("cached.sh", "echo original\n");
    const first = await runSteps([scriptStep(digest)], ["h02"]);
    expect(first.tasks.get("h02")!.state).toBe(TaskState.SUCCEEDED);
    writeFileSync(join(proxyBlobs(), digest.slice(7)), "echo tampered\n");
    const r = await runSteps([scriptStep(digest)], ["h02"]);
    const t = r.tasks.get("h02")!;
    expect(t.state).toBe(TaskState.FAILED);
    expect(t.message).toContain(digest);
    expect(r.stdout.get("h02")).toBeUndefined();
  });

  it("file.put writes inside base_dir with its mode and refuses path escapes", async () => {
    const content = "listen 8080;\n";
    const digest = await put("app.conf", content);
    const base = join(work, "base");
    const outside = join(work, "outside");
    mkdirSync(base);
    mkdirSync(outside);
    symlinkSync(outside, join(base, "escape"));

    // Legal, through the CLI.
    const ok = await rexmesh(["run", "-H", "h03", "--put", digest, "--to", "app.conf", "--base-dir", base, "--mode", "640"], mesh.exports());
    expect(ok.code, ok.stdout + ok.stderr).toBe(0);
    expect(readFileSync(join(base, "app.conf"), "utf8")).toBe(content);
    expect(statSync(join(base, "app.conf")).mode & 0o777).toBe(0o640);

    // ".." and absolute paths are refused at submit, before anything travels.
    for (const to of ["../escaped.conf", "/etc/escaped.conf", "a/../../escaped.conf"]) {
      const r = await rexmesh(["run", "-H", "h03", "--put", digest, "--to", to, "--base-dir", base], mesh.exports());
      expect(r.code, to).toBe(2);
      expect(r.stderr, to).toMatch(/InvalidArgument: .*file\.put refused/);
    }
    // A symlink leading out is found by the daemon: FAILED with the reason, nothing written outside.
    const step: Step = { $typeName: "rexmesh.v1.Step", name: "", tool: { case: "filePut", value: { $typeName: "rexmesh.v1.FilePutTool", artifact: digest, path: "escape/app.conf", baseDir: base, mode: 0o644 } } };
    const r = await runSteps([step], ["h03"]);
    const t = r.tasks.get("h03")!;
    expect(t.state).toBe(TaskState.FAILED);
    expect(t.message).toMatch(/outside/);
    expect(readdirSync(outside)).toEqual([]);
  });
});
