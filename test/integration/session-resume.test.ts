import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { ConnectionState } from "../../gen/rexmesh/v1/controller_pb.js";
import { cliEnv, clientOf, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * A session survives its proxy (docs/sessions.md, "Resume"), on a real
 * mesh: the proxy is killed with SIGKILL while the session's bytes are in
 * flight through it, and restarted, or the host fails over to the other
 * proxy of its region. The session pauses and resumes; what the remote
 * side printed, and what was typed into it, arrives whole, once, in order.
 */

/** The CLI as a child with pipes, its output collected; `exitCode` resolves when it is done. */
function cli(args: string[], env: Record<string, string>) {
  const child: ChildProcessWithoutNullStreams = spawn(process.execPath, [REXMESH_BIN, ...args], { env: cliEnv(env), stdio: ["pipe", "pipe", "pipe"] });
  const out: Buffer[] = [];
  let outBytes = 0;
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => {
    out.push(d);
    outBytes += d.length;
  });
  const seen: { cut?: number; resumed?: number } = {};
  child.stderr.on("data", (d: Buffer) => {
    stderr += d.toString();
    if (seen.cut === undefined && /was cut/.test(stderr)) seen.cut = Date.now();
    if (seen.resumed === undefined && /resumed through/.test(stderr)) seen.resumed = Date.now();
  });
  child.stdin.on("error", () => undefined);
  const exitCode = new Promise<number>((resolve) => child.on("close", (code) => resolve(code ?? 255)));
  /** From the operator's first word of the cut to the word that it resumed, in ms. */
  const pauseMs = () => (seen.cut !== undefined && seen.resumed !== undefined ? seen.resumed - seen.cut : undefined);
  return { child, exitCode, stdout: () => Buffer.concat(out).toString(), outBytes: () => outBytes, stderr: () => stderr, pauseMs };
}

/** `seq 1 n` as it prints it. */
const seq = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => `${from + i}\n`).join("");

describe("a session whose proxy dies", () => {
  const work = tempDir("session-resume");
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east"],
    proxiesPerRegion: 2,
    tenant: "acme",
    hosts: [{ id: "h1", region: "east" }],
    controllerArgs: ["--sessions"],
    // A graceful stop waits this long for the streams through the proxy before it closes them.
    proxyArgs: ["--grace", "2s"],
  });

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
  }, 60_000);

  afterAll(async () => {
    await mesh.stop();
  });

  /** The proxy the host is connected to now, as the controller's inventory says. */
  async function proxyOfHost() {
    const conn = clientOf(mesh);
    try {
      const { hosts } = await conn.client.listHosts({});
      const name = hosts.find((h) => h.id === "h1" && h.connection === ConnectionState.CONNECTED)?.proxy;
      const p = mesh.proxies.find((x) => x.name === name);
      if (!p) throw new Error(`h1 is at no known proxy (${name})`);
      return p;
    } finally {
      conn.close();
    }
  }

  it(
    "SIGKILL and restart with output in flight at every hop: the remote sequence arrives whole, once, in order, and the exit status too",
    async () => {
      const total = 600_000; // about 4 MB of `seq`: far more than every window on the way holds
      const s = cli(["shell", "h1", "-T", "--", "sh", "-c", `seq 1 ${total}; exit 5`], mesh.exports());
      // Some output through; then the CLI stops reading, so the windows of every hop fill up behind it.
      await until("first output", async () => (s.outBytes() > 64 * 1024 ? true : undefined));
      s.child.stdout.pause();
      await new Promise((r) => setTimeout(r, 1500));
      const proxy = await proxyOfHost();
      proxy.proc.kill("SIGKILL");
      await mesh.exited(proxy);
      await mesh.restart(proxy);
      s.child.stdout.resume();
      const code = await s.exitCode;
      expect(s.stderr()).toMatch(/rexmesh: the session's leg through proxy .* was cut/);
      expect(s.stderr()).toMatch(/rexmesh: the session resumed through proxy/);
      const got = s.stdout();
      // Checked as the sequence: a lost or repeated line shows where.
      const lines = got.split("\n");
      lines.pop();
      const firstWrong = lines.findIndex((l, i) => l !== String(i + 1));
      expect(firstWrong, `line ${firstWrong + 1} is ${JSON.stringify(lines[firstWrong])}`).toBe(-1);
      expect(lines.length).toBe(total);
      expect(got === seq(1, total)).toBe(true);
      expect(code).toBe(5);
      console.log(`session resume: proxy SIGKILLed and restarted; the session paused ${s.pauseMs()} ms (cut notice to resumed notice), ${total} lines whole`);
    },
    120_000,
  );

  it(
    "input typed across the cut reaches the process whole and once: the host fails over to the other proxy of its region",
    async () => {
      const s = cli(["run", "-H", "h1", "--stdin", "-", "--", "cat"], mesh.exports());
      let sent = "";
      let n = 0;
      const write = () => {
        const line = `input line ${++n} ${"x".repeat(n % 97)}\n`;
        sent += line;
        s.child.stdin.write(line);
      };
      // A steady stream of input before, during and after the proxy's death.
      const writer = setInterval(() => {
        for (let i = 0; i < 20; i++) write();
      }, 5);
      try {
        await until("echoed input", async () => (s.outBytes() > 20_000 ? true : undefined));
        const proxy = await proxyOfHost();
        proxy.proc.kill("SIGKILL");
        await mesh.exited(proxy);
        // Not restarted: the host reconnects to the region's other proxy, and the session resumes there.
        await until("the session resumed", async () => (/resumed through proxy/.test(s.stderr()) ? true : undefined), 60_000);
        const other = await proxyOfHost();
        expect(other.name).not.toBe(proxy.name);
        await new Promise((r) => setTimeout(r, 300));
        clearInterval(writer);
        s.child.stdin.end();
        expect(await s.exitCode).toBe(0);
        expect(s.stdout().length).toBe(sent.length);
        expect(s.stdout() === sent).toBe(true);
        console.log(`session resume: failover to the region's other proxy; the session paused ${s.pauseMs()} ms, ${n} input lines echoed whole`);
        await mesh.restart(proxy);
      } finally {
        clearInterval(writer);
      }
    },
    120_000,
  );

  it(
    "a graceful stop of the proxy (SIGTERM, as a rolling restart does): the session moves to the region's other proxy when the stop closes its streams, input and output whole",
    async () => {
      const s = cli(["run", "-H", "h1", "--stdin", "-", "--", "cat"], mesh.exports());
      let sent = "";
      let n = 0;
      const writer = setInterval(() => {
        for (let i = 0; i < 20; i++) {
          const line = `graceful ${++n}\n`;
          sent += line;
          s.child.stdin.write(line);
        }
      }, 5);
      try {
        await until("echoed input", async () => (s.outBytes() > 10_000 ? true : undefined));
        const proxy = await proxyOfHost();
        proxy.proc.kill("SIGTERM");
        await until("the session resumed", async () => (/resumed through proxy/.test(s.stderr()) ? true : undefined), 60_000);
        await mesh.exited(proxy);
        await new Promise((r) => setTimeout(r, 300));
        clearInterval(writer);
        s.child.stdin.end();
        expect(await s.exitCode).toBe(0);
        expect(s.stdout() === sent).toBe(true);
        console.log(`session resume: graceful proxy stop; the session paused ${s.pauseMs()} ms, ${n} input lines echoed whole`);
        await mesh.restart(proxy);
      } finally {
        clearInterval(writer);
      }
    },
    120_000,
  );
});
