// Baseline: raw NATS fan-out request/reply, the broker design Choria uses.
//
// A private nats-server (Debian package nats-server) on 127.0.0.1 and a free
// port, `subscribers` Node clients (npm `nats`, one TCP connection each)
// spread over a few child processes, each subscribed to one common subject
// and replying to every request. One requester publishes a single request
// with an inbox as reply subject and counts replies: the figure is first
// publish → last reply. By default plain TCP, no TLS and no authentication
// (rexmesh's links are all mTLS), so this is the broker's floor, not
// Choria's. With `tls: true` (`--tls 1`) every connection is mutual TLS, as
// rexmesh's are: a CA (RSA-3072, as rexmesh's) and P-256 leaf keys (as
// rexmesh's) made with openssl, the server verifying each client's
// certificate against the CA (`verify: true`). The clients share one
// certificate (issuing 10,000 would cost the bench minutes and no handshake
// any less: each connection still does its own full handshake).
//
//   node bench/baselines/nats.mjs --subscribers 2000 [--runs 3] [--processes 4] [--tls 1]
import { execFileSync, fork, spawn } from "node:child_process";
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import { join } from "node:path";
import { cpuMs } from "../lib/proc.mjs";
import { ensureBinary, ensureNpm } from "./install.mjs";

const here = new URL(".", import.meta.url).pathname;
const log = (msg) => process.stderr.write(`  [nats] ${msg}\n`);

/** A free TCP port on 127.0.0.1 (bind port 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves when a TCP connect to port succeeds; rejects after timeoutMs or when proc exits. */
async function waitPort(port, proc, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`nats-server exited (${proc.signalCode ?? proc.exitCode})`);
    const ok = await new Promise((res) => {
      const c = net.connect(port, "127.0.0.1");
      c.once("connect", () => (c.destroy(), res(true)));
      c.once("error", () => res(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nats-server not listening on ${port} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Ends a child: a polite signal (or message), SIGKILL after graceMs. */
function stopChild(proc, graceMs = 5000, how = () => proc.kill("SIGTERM")) {
  return new Promise((res) => {
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return res();
    const t = setTimeout(() => proc.kill("SIGKILL"), graceMs);
    proc.once("exit", () => (clearTimeout(t), res()));
    try {
      how();
    } catch {
      proc.kill("SIGKILL");
    }
  });
}

/**
 * A CA and two leaves (the server's for 127.0.0.1, the clients'), PEM files
 * in `dir`: ca.pem, server.pem, server.key, client.pem, client.key.
 */
function makeTlsFiles(dir) {
  const ossl = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  ossl("req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench nats CA");
  for (const [name, ext] of [
    ["server", ["subjectAltName=IP:127.0.0.1,DNS:localhost", "extendedKeyUsage=serverAuth"]],
    ["client", ["extendedKeyUsage=clientAuth"]],
  ]) {
    writeFileSync(join(dir, `${name}.ext`), ext.join("\n") + "\n");
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=bench nats ${name}`);
    ossl("x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", `${name}.pem`, "-days", "2", "-extfile", `${name}.ext`);
  }
  return { ca: join(dir, "ca.pem"), serverCert: join(dir, "server.pem"), serverKey: join(dir, "server.key"), clientCert: join(dir, "client.pem"), clientKey: join(dir, "client.key") };
}

/**
 * → { available, skipped?, subscribers, processes, runsMs, medianMs, bestMs,
 *     connectMs, connectCpuUsPerConnection: { server, clients },
 *     serverCpuUsPerReply, server, client, tls, note }
 */
export async function natsFanout({ subscribers, runs = 3, processes, timeoutMs = 120_000, tls = false, warmup = 1 } = {}) {
  if (!(subscribers > 0)) throw new Error("natsFanout: subscribers must be a positive number");
  const base = tls
    ? { subscribers, tls: true, note: "mutual TLS on loopback (P-256 leaves, RSA-3072 CA, every client's certificate verified), no durability" }
    : { subscribers, tls: false, note: "plain TCP on loopback, no TLS, no auth: the broker's floor" };
  const bin = await ensureBinary("nats-server", "nats-server");
  if (!bin.ok) return { available: false, skipped: bin.skipped, ...base };
  const mod = await ensureNpm("nats");
  if (!mod.ok) return { available: false, skipped: mod.skipped, ...base };
  // One process may hold at most 20,000 fds (one per connection here), and there are 2 cores.
  const procs = processes ?? Math.min(4, Math.max(1, Math.ceil(subscribers / 250)));
  const dir = mkdtempSync(join(os.tmpdir(), "rexmesh-bench-nats-"));
  const children = [];
  let server;
  let requester;
  const killAll = () => {
    for (const c of [...children, server]) if (c && c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  };
  process.once("exit", killAll);
  try {
    const port = await freePort();
    const files = tls ? makeTlsFiles(dir) : undefined;
    const clientTls = files ? { ca: readFileSync(files.ca, "utf8"), cert: readFileSync(files.clientCert, "utf8"), key: readFileSync(files.clientKey, "utf8") } : undefined;
    const cfg = join(dir, "nats.conf");
    writeFileSync(
      cfg,
      [
        `listen: "127.0.0.1:${port}"`,
        `max_connections: ${subscribers + 100}`,
        `max_subscriptions: 0`,
        `max_pending: 268435456`,
        `write_deadline: "30s"`,
        `ping_interval: "10m"`,
        ...(files ? ["tls {", `  cert_file: "${files.serverCert}"`, `  key_file: "${files.serverKey}"`, `  ca_file: "${files.ca}"`, "  verify: true", "  timeout: 30", "}"] : []),
        "",
      ].join("\n"),
    );
    const logFd = openSync(join(dir, "nats-server.log"), "a");
    server = spawn(bin.paths["nats-server"], ["-c", cfg], { stdio: ["ignore", logFd, logFd] });
    closeSync(logFd);
    await waitPort(port, server, 15_000);
    const version = (/Version:\s*(\S+)/.exec(readFileSync(join(dir, "nats-server.log"), "utf8")) ?? [])[1];
    const url = `127.0.0.1:${port}`;
    const subject = "bench.fanout";

    // The subscribers, spread over `procs` children.
    const serverCpu0 = cpuMs(server.pid);
    const t0 = performance.now();
    const per = Math.ceil(subscribers / procs);
    const ready = [];
    for (let p = 0, first = 0; p < procs && first < subscribers; p++, first += per) {
      const count = Math.min(per, subscribers - first);
      const child = fork(join(here, "nats-worker.mjs"), [], {
        env: { ...process.env, NATS_MODULE_URL: mod.url, NATS_SERVER: url, NATS_SUBJECT: subject, NATS_FIRST: String(first), NATS_COUNT: String(count), ...(files ? { NATS_TLS: JSON.stringify(clientTls) } : {}) },
        stdio: ["ignore", "inherit", "inherit", "ipc"],
      });
      children.push(child);
      ready.push(
        new Promise((res, rej) => {
          const readyMs = Math.max(timeoutMs, subscribers * 30);
          const t = setTimeout(() => rej(new Error(`nats worker ${p}: not ready after ${readyMs} ms`)), readyMs);
          child.once("message", (m) => {
            clearTimeout(t);
            m.ready ? res(m) : rej(new Error(`nats worker ${p}: ${m.error}`));
          });
          child.once("exit", (code, sig) => (clearTimeout(t), rej(new Error(`nats worker ${p} exited (${sig ?? code})`))));
        }),
      );
    }
    const workers = await Promise.all(ready);
    const connectMs = Math.round(performance.now() - t0);
    // CPU per connection while connecting: the server's (Go, all its threads) and the clients' (Node, as the simulated hosts).
    const connectCpuUsPerConnection = {
      server: Math.round(((cpuMs(server.pid) - serverCpu0) * 1000) / subscribers),
      clients: Math.round((workers.reduce((a, w) => a + (w.cpuMs ?? 0), 0) * 1000) / subscribers),
    };
    log(`${subscribers} subscribers connected over ${children.length} processes in ${connectMs} ms`);

    // The requester: one publish, count replies on an inbox.
    const { connect, createInbox } = await import(mod.url);
    requester = await connect({ servers: url, name: "requester", reconnect: false, noEcho: true, pingInterval: 600_000, ...(clientTls ? { tls: clientTls } : {}) });
    const payload = new TextEncoder().encode("hostname");
    const runsMs = [];
    const serverCpuUsPerReply = [];
    for (let r = 0; r < runs + warmup; r++) {
      const cpu0 = cpuMs(server.pid);
      const inbox = createInbox();
      const seen = new Set();
      let got = 0;
      let resolveDone;
      const done = new Promise((res) => (resolveDone = res));
      const dec = new TextDecoder();
      const sub = requester.subscribe(inbox, {
        callback: (err, msg) => {
          if (err) return;
          got++;
          seen.add(dec.decode(msg.data));
          if (got === subscribers) resolveDone(performance.now());
        },
      });
      await requester.flush();
      const s = performance.now();
      requester.publish(subject, payload, { reply: inbox });
      let timer;
      const end = await Promise.race([done, new Promise((res) => (timer = setTimeout(res, timeoutMs)))]);
      clearTimeout(timer);
      sub.unsubscribe();
      if (end === undefined) throw new Error(`run ${r}: ${got} of ${subscribers} replies after ${timeoutMs} ms`);
      if (seen.size !== subscribers) throw new Error(`run ${r}: ${seen.size} distinct repliers of ${subscribers}`);
      // The first rounds are a warm-up (JIT in the children), not counted: as many as rexmesh's series gets.
      if (r >= warmup) {
        runsMs.push(Math.round((end - s) * 10) / 10);
        serverCpuUsPerReply.push(Math.round(((cpuMs(server.pid) - cpu0) * 1000) / subscribers));
      }
      await sleep(200);
    }
    const sorted = [...runsMs].sort((a, b) => a - b);
    return {
      available: true,
      ...base,
      processes: children.length,
      runsMs,
      medianMs: sorted[Math.floor(sorted.length / 2)],
      bestMs: sorted[0],
      connectMs,
      connectCpuUsPerConnection,
      serverCpuUsPerReply,
      workerConnectMs: workers.map((w) => w.connectMs),
      server: `nats-server ${version ?? "?"}`,
      client: `nats.js ${mod.version}`,
    };
  } catch (err) {
    const tail = (() => {
      try {
        return readFileSync(join(dir, "nats-server.log"), "utf8").trim().split("\n").slice(-3).join(" | ");
      } catch {
        return "";
      }
    })();
    throw new Error(`natsFanout(${subscribers}): ${err?.message ?? err}${tail ? ` [server log: ${tail}]` : ""}`);
  } finally {
    if (requester) await Promise.race([requester.close().catch(() => {}), new Promise((r) => setTimeout(r, 3000).unref())]);
    await Promise.all(children.map((c) => stopChild(c, 5000, () => c.send("stop"))));
    await stopChild(server, 5000);
    process.off("exit", killAll);
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const arg = (n, d) => {
    const i = process.argv.indexOf(`--${n}`);
    return i < 0 ? d : Number(process.argv[i + 1]);
  };
  const r = await natsFanout({ subscribers: arg("subscribers", 2000), runs: arg("runs", 3), processes: arg("processes", undefined), tls: arg("tls", 0) === 1 });
  process.stdout.write(JSON.stringify(r, null, 2) + "\n");
}
