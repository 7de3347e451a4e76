import { execFile } from "node:child_process";
import net from "node:net";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { clientOf, SilentCut, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

type Ran = { code: number | null; signal: string | null; stdout: string; stderr: string; ms: number };

/**
 * Runs the real CLI, killing it after `killMs`; resolves with its exit code,
 * output and how long it ran. `onStdout` sees the output as it comes.
 */
function cli(args: string[], env: Record<string, string>, killMs: number, onStdout?: (soFar: string) => void): Promise<Ran> {
  const clean: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) clean[k] = v;
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [REXMESH_BIN, ...args], { env: { ...clean, ...env }, timeout: killMs }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number; signal?: string }) | null;
      resolve({ code: e ? (typeof e.code === "number" ? e.code : null) : 0, signal: e?.signal ?? null, stdout, stderr, ms: Date.now() - t0 });
    });
    let soFar = "";
    child.stdout?.on("data", (d: Buffer) => onStdout?.((soFar += d.toString())));
    child.stdin?.end();
  });
}

/**
 * Issue 12, CLI robustness: against a silent address the CLI ends with a clear
 * error within a bound (it hung), and a keep-alive PING that times out ends it
 * with a clear error and a non-zero exit (it died of an unhandled 'error').
 */
describe("the CLI against silent peers", () => {
  const work = tempDir("cli-robust");
  const mesh = new LocalMesh({ ca: testCa(), dir: join(work, "mesh"), regions: ["east"], hosts: [{ id: "h1", region: "east" }] });
  let silent: net.Server;
  let silentAddress = "";
  const accepted: net.Socket[] = [];

  beforeAll(async () => {
    silent = net.createServer((s) => {
      // Accepts, reads, and never says a word.
      accepted.push(s);
      s.on("error", () => undefined);
      s.resume();
    });
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    silentAddress = `127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
    await mesh.start();
    await mesh.waitForHosts(1);
  });
  afterAll(async () => {
    for (const s of accepted) s.destroy();
    silent.close();
    await mesh.stop();
  });

  it("ends with a clear error and a non-zero exit within its connect timeout when the controller says nothing", async () => {
    const env = { ...mesh.exports(), REXMESH_CONTROLLER: silentAddress };
    const quick = await cli(["hosts", "--connect-timeout", "1s"], env, 20_000);
    expect(quick.signal, "killed: the CLI hung").toBeNull();
    expect(quick.code).not.toBe(0);
    expect(quick.stderr).toMatch(/Unavailable: could not connect to 127\.0\.0\.1:\d+ within 1s/);
    expect(quick.ms).toBeLessThan(8_000);
    // The default bound (10 s) holds too.
    const byDefault = await cli(["hosts"], env, 30_000);
    expect(byDefault.signal, "killed: the CLI hung").toBeNull();
    expect(byDefault.code).not.toBe(0);
    expect(byDefault.stderr).toMatch(/could not connect .* within 10s/);
    expect(byDefault.ms).toBeLessThan(25_000);
  });

  it("ends with a clear error, not a crash, when a keep-alive PING goes unanswered", async () => {
    const { client, close } = clientOf(mesh);
    const { job } = await client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h1"], steps: [{ tool: { case: "shell", value: { script: "for i in $(seq 1 30); do echo tick $i; sleep 1; done" } } }] }));
    close();
    const relay = await SilentCut.start(mesh.controllerAddress);
    try {
      // Cut the link once output flows: every byte is held, nothing is closed.
      const r = await cli(["jobs", "watch", job!.id, "--keepalive", "500ms"], { ...mesh.exports(), REXMESH_CONTROLLER: relay.address }, 40_000, (soFar) => {
        if (soFar.includes("tick 1")) relay.stop();
      });
      expect(r.signal, "killed: the CLI hung").toBeNull();
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/tick 1/);
      expect(r.stderr).toMatch(/Unavailable: .*PING timed out/);
      expect(r.stderr).not.toMatch(/Unhandled 'error' event|node:events|    at /);
    } finally {
      relay.close();
    }
  });
});
