import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer, request, type Server } from "node:http";
import { connect } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { cliEnv, rexmesh, tempDir, until, writePolicy } from "./support.js";
import { testCa } from "../test-ca.js";

/** Deterministic bytes for a path: what the forwarded requests must get back exactly. */
function body(path: string, bytes: number): Buffer {
  const out = Buffer.alloc(bytes);
  let block = createHash("sha256").update(path).digest();
  for (let at = 0; at < bytes; at += block.length) {
    block.copy(out, at);
    block = createHash("sha256").update(block).digest();
  }
  return out;
}

/**
 * `rexmesh forward` end to end: a real mesh (controller, proxy, daemon over
 * mTLS), the real CLI, an HTTP server on the host's loopback (the host is
 * this machine).
 */
describe("rexmesh forward through the mesh", () => {
  const work = tempDir("forward");
  const policyFile = writePolicy(
    work,
    `
roles:
  admin:
    hosts: all
    actions: ["*", session, forward]
    commands: ["*"]
  shells-only:
    hosts: all
    actions: [session]
    shell: true
bindings:
  acme/dev: admin
  acme/shells: shells-only
`,
  );
  const listen = ["--metrics-listen", "127.0.0.1:0"];
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east"],
    tenant: "acme",
    hosts: [{ id: "h1", region: "east" }],
    controllerArgs: ["--policy", policyFile, "--sessions", ...listen],
    proxyArgs: listen,
    daemonArgs: listen,
  });
  const metric = async (address: unknown, series: string) => {
    const text = await (await fetch(`http://${String(address)}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith(`${series} `));
    return line ? Number(line.slice(series.length + 1)) : undefined;
  };
  let http: Server;
  let httpPort = 0;
  /** Bytes the HTTP server has handed to its endless responses' sockets. */
  let endlessWritten = 0;
  const forwards: ChildProcess[] = [];

  beforeAll(async () => {
    http = createServer((req, res) => {
      if (req.url === "/endless") {
        // Writes as long as the reader takes: a reader that stalls stalls this writer.
        const chunk = Buffer.alloc(64 << 10, 120);
        const more = () => {
          do endlessWritten += chunk.length;
          while (res.write(chunk));
        };
        res.on("drain", more);
        more();
        return;
      }
      const size = Number(/size=(\d+)/.exec(req.url ?? "")?.[1] ?? 1000);
      res.end(body(req.url ?? "", size));
    });
    await new Promise<void>((r) => http.listen(0, "127.0.0.1", () => r()));
    httpPort = (http.address() as { port: number }).port;
    await mesh.start();
    await mesh.waitForHosts(1);
  });

  afterAll(async () => {
    for (const f of forwards) f.kill("SIGKILL");
    http?.closeAllConnections();
    http?.close();
    await mesh.stop();
  });

  /** Starts `rexmesh forward h1 0:TARGET`; resolves with the local port it prints. */
  const forward = async (target: string, env = mesh.exports()) => {
    const child = spawn(process.execPath, [REXMESH_BIN, "forward", "h1", `0:${target}`], { env: cliEnv(env), stdio: ["ignore", "pipe", "pipe"] });
    forwards.push(child);
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((r) => child.on("close", (code) => r(code)));
    const port = await until("the forward's local port", async () => {
      const m = /forwarding 127\.0\.0\.1:(\d+) to /.exec(out);
      if (m) return Number(m[1]);
      if (child.exitCode !== null) throw new Error(`rexmesh forward exited ${child.exitCode}: ${err}`);
      return undefined;
    });
    return { child, port, exited, stderr: () => err };
  };

  const get = (port: number, path: string) =>
    new Promise<Buffer>((resolve, reject) => {
      const req = request({ host: "127.0.0.1", port, path, agent: false }, (res) => {
        const parts: Buffer[] = [];
        res.on("data", (d: Buffer) => parts.push(d));
        res.on("end", () => resolve(Buffer.concat(parts)));
        res.on("error", reject);
      });
      req.on("error", reject);
      req.end();
    });

  it("serves 100 parallel requests to an HTTP server on the host, each byte for byte, and stops on Ctrl-C with status 0", async () => {
    const f = await forward(`127.0.0.1:${httpPort}`);
    const paths = Array.from({ length: 100 }, (_, i) => `/r${i}?size=${1000 + i * 12001}`);
    const started = Date.now();
    const bodies = await Promise.all(paths.map((p) => get(f.port, p)));
    const seconds = (Date.now() - started) / 1000;
    const bytes = bodies.reduce((n, b) => n + b.length, 0);
    for (const [i, p] of paths.entries()) expect(bodies[i]!.equals(body(p, 1000 + i * 12001))).toBe(true);
    console.log(`forward: 100 parallel requests, ${(bytes / 1e6).toFixed(1)} MB in ${seconds.toFixed(2)} s`);
    // While it is open, each role counts it.
    expect(await metric(mesh.controller.info!.metricsAddress, 'rexmesh_sessions_open{kind="forward"}')).toBe(1);
    expect(await metric(mesh.controller.info!.metricsAddress, 'rexmesh_session_bytes_total{direction="from_host"}')).toBeGreaterThanOrEqual(bytes);
    expect(await metric(mesh.proxies[0]!.info!.metricsAddress, "rexmesh_sessions_relayed")).toBe(1);
    expect(await metric(mesh.daemons[0]!.info!.metricsAddress, "rexmesh_sessions_open")).toBe(1);
    f.child.kill("SIGINT");
    expect(await f.exited).toBe(0);
  });

  it("keeps every hop's memory flat when a connection's reader stalls, and the other connections keep going", async () => {
    const f = await forward(`127.0.0.1:${httpPort}`);
    // A client that asks for an endless body and reads nothing of it.
    const stalled = connect({ host: "127.0.0.1", port: f.port });
    stalled.write("GET /endless HTTP/1.1\r\nHost: x\r\n\r\n");
    stalled.pause();
    try {
      const rss = (pid: number) => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) * 1024;
      const hops = { cli: f.child.pid!, controller: mesh.controller.proc.pid!, proxy: mesh.proxies[0]!.proc.pid!, daemon: mesh.daemons[0]!.proc.pid! };
      // Meanwhile the forward serves other connections.
      for (let i = 0; i < 5; i++) expect((await get(f.port, `/after${i}?size=300000`)).equals(body(`/after${i}?size=300000`, 300000))).toBe(true);
      // What is in flight settles within a moment (socket buffers fill, each hop's window); from then on nothing
      // may grow, and the server's writer is blocked: the stalled reader slowed the sender.
      await new Promise((r) => setTimeout(r, 1500));
      const before = Object.fromEntries(Object.entries(hops).map(([k, pid]) => [k, rss(pid)]));
      const wroteBefore = endlessWritten;
      await new Promise((r) => setTimeout(r, 3000));
      const growth = Object.fromEntries(Object.entries(hops).map(([k, pid]) => [k, rss(pid) - before[k]!]));
      console.log(`forward, stalled reader: ${(wroteBefore / 1e6).toFixed(1)} MB written by the server in all; RSS growth over 3 s (bytes) ${JSON.stringify(growth)}`);
      expect(endlessWritten).toBe(wroteBefore);
      expect(wroteBefore).toBeLessThan(32 << 20);
      for (const g of Object.values(growth)) expect(g).toBeLessThan(4 << 20);
    } finally {
      stalled.destroy();
      f.child.kill("SIGINT");
      await f.exited;
    }
  });

  it("closes a connection whose target refuses it, and the forward goes on", async () => {
    const closed = await new Promise<Server>((r) => {
      const s = createServer();
      s.listen(0, "127.0.0.1", () => r(s));
    });
    const deadPort = (closed.address() as { port: number }).port;
    await new Promise((r) => closed.close(r));
    const f = await forward(`127.0.0.1:${deadPort}`);
    await expect(get(f.port, "/x")).rejects.toThrow(/socket hang up|ECONNRESET/);
    await expect(get(f.port, "/y")).rejects.toThrow(/socket hang up|ECONNRESET/);
    expect(f.child.exitCode).toBeNull();
    f.child.kill("SIGINT");
    expect(await f.exited).toBe(0);
  });

  it("refuses an operator without `forward`, and a target outside the role's forwardTo (the host's loopback by default)", async () => {
    const shells = mesh.issue({ role: "operator", scope: "acme", id: "shells" }, join(work, "shells"));
    const env = { REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: shells.cert, REXMESH_KEY: shells.key, REXMESH_CA: shells.ca };
    const none = await rexmesh(["forward", "h1", `0:127.0.0.1:${httpPort}`], env);
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/PermissionDenied: operator acme\/shells may not forward/);
    const outside = await rexmesh(["forward", "h1", "0:10.1.2.3:80"], mesh.exports());
    expect(outside.code).toBe(1);
    expect(outside.stderr).toMatch(/may not forward to 10\.1\.2\.3:80: no role lists it in forwardTo \(allowed: 127\.0\.0\.1:\*, ::1:\*, localhost:\*/);
    const bad = await rexmesh(["forward", "h1", "0:127.0.0.1:99999"], mesh.exports());
    expect(bad.stderr).toMatch(/is not \[LOCAL_ADDR:\]LOCAL_PORT:REMOTE_ADDR:REMOTE_PORT/);
  });
});
