#!/usr/bin/env node
// Link-transport benchmark: @connectrpc/connect-node vs @grpc/grpc-js for the
// AgentLink bidi stream over mTLS on 127.0.0.1.
//
//   node bench/link-transport/run.mjs            # full suite (≈ 7 min on 2 cores)
//   node bench/link-transport/run.mjs --quick    # smoke run (small counts, ≈ 1 min)
//
// Options: --impls connect,grpcjs  --idle-k 2000,5000  --rsa-k 2000  --big-k 10000
//          --no-throughput --no-idle --no-floor --out FILE   (an empty list skips: --big-k "")
// The idle runs also measure "node-http2": node:http2 with hand-written gRPC
// framing and no library, as the floor of what Node's TLS + HTTP/2 cost.
// Every run is bounded (≤ 60 s, children killed by pid on overrun).
// Prints a table and writes bench/results/link-transport.json.
import { fork } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join, relative } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { buildGen } from "./build-gen.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");

const { values: opt } = parseArgs({
  options: {
    quick: { type: "boolean", default: false },
    impls: { type: "string", default: "connect,grpcjs" },
    "idle-k": { type: "string" },
    "rsa-k": { type: "string" },
    "big-k": { type: "string" },
    "no-throughput": { type: "boolean", default: false },
    "no-idle": { type: "boolean", default: false },
    "no-floor": { type: "boolean", default: false },
    out: { type: "string", default: join(root, "bench", "results", "link-transport.json") },
  },
});
const quick = opt.quick;
const impls = opt.impls.split(",");
const list = (s, d) => (s === undefined ? d : s === "" ? [] : s.split(",").map(Number));
const idleKs = list(opt["idle-k"], quick ? [200] : [2000, 5000]);
const rsaKs = list(opt["rsa-k"], quick ? [200] : [2000]);
const bigKs = list(opt["big-k"], quick ? [] : [10000]);
const RUN_LIMIT_MS = 60_000;
const SUITE_LIMIT_MS = 10 * 60_000;
const suiteStart = Date.now();

const libVersion = (p) => JSON.parse(readFileSync(join(root, "node_modules", p, "package.json"), "utf8")).version;
const versions = {
  node: process.version,
  "@connectrpc/connect-node": libVersion("@connectrpc/connect-node"),
  "@grpc/grpc-js": libVersion("@grpc/grpc-js"),
  "@bufbuild/protobuf": libVersion("@bufbuild/protobuf"),
};

// ---------------------------------------------------------------------------
// child processes

const children = new Set();

function spawnChild(script, args, label) {
  return new Promise((resolve, reject) => {
    const child = fork(join(here, script), args, {
      // DEP0123: grpc-js passes the IP address of the target as TLS servername.
      execArgv: ["--expose-gc", "--max-old-space-size=8192", "--disable-warning=DEP0123"],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    children.add(child);
    const pending = new Map();
    let seq = 0;
    child.on("exit", (code, sig) => {
      children.delete(child);
      for (const p of pending.values()) p.reject(new Error(`${label} exited (${code ?? sig})`));
      pending.clear();
    });
    child.on("message", (m) => {
      if (m.ready) {
        resolve({
          pid: child.pid, port: m.port, label,
          call(cmd, body = {}, timeoutMs = RUN_LIMIT_MS) {
            const id = ++seq;
            return new Promise((res, rej) => {
              const t = setTimeout(() => { pending.delete(id); rej(new Error(`${label} ${cmd}: no answer in ${timeoutMs} ms`)); }, timeoutMs);
              pending.set(id, {
                resolve: (v) => { clearTimeout(t); res(v); },
                reject: (e) => { clearTimeout(t); rej(e); },
              });
              child.send({ id, cmd, ...body });
            });
          },
          kill() { if (child.exitCode === null && child.signalCode === null) process.kill(child.pid, "SIGKILL"); },
        });
        return;
      }
      const p = pending.get(m.id);
      if (!p) return;
      pending.delete(m.id);
      if (m.error) p.reject(new Error(`${label}: ${m.error}`)); else p.resolve(m);
    });
    child.on("error", reject);
    setTimeout(() => reject(new Error(`${label} did not start`)), 20_000).unref();
  });
}

// The machine may be shared (other sessions run tests on the same 2 cores):
// record how much CPU was used by processes other than this benchmark during
// each run, from /proc/stat minus the CPU time of the runner and its children.
function machineBusyTicks() {
  try {
    const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
    return f.reduce((a, b) => a + b, 0) - f[3] - f[4]; // minus idle, iowait
  } catch { return NaN; }
}
function procTicks(pid) {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = st.slice(st.lastIndexOf(")") + 2).split(" ");
    return Number(f[11]) + Number(f[12]); // utime + stime
  } catch { return 0; }
}
const TICK = 100; // USER_HZ

/** Runs fn with a hard limit; kills the children it started on overrun. */
async function bounded(name, fn) {
  if (Date.now() - suiteStart > SUITE_LIMIT_MS - RUN_LIMIT_MS) {
    console.log(`  skip ${name}: suite time budget spent`);
    return { name, skipped: "suite time budget" };
  }
  const started = [];
  const spawn = async (...a) => { const c = await spawnChild(...a); started.push(c); return c; };
  let timer;
  const t0 = Date.now();
  const busy0 = machineBusyTicks();
  const self0 = procTicks(process.pid);
  const otherLoad = () => {
    const ours = started.reduce((a, c) => a + procTicks(c.pid), 0) + procTicks(process.pid) - self0;
    const foreign = (machineBusyTicks() - busy0 - ours) / TICK;
    return Math.max(0, foreign / ((Date.now() - t0) / 1000));
  };
  try {
    const r = await Promise.race([
      fn(spawn, t0 + RUN_LIMIT_MS),
      new Promise((_, rej) => { timer = setTimeout(() => rej(new Error(`run limit ${RUN_LIMIT_MS} ms exceeded`)), RUN_LIMIT_MS); }),
    ]);
    return { name, ...r, runMs: Date.now() - t0, otherLoadCores: otherLoad() };
  } catch (e) {
    console.log(`  ${name} FAILED: ${e.message}`);
    return { name, error: e.message, runMs: Date.now() - t0, otherLoadCores: otherLoad() };
  } finally {
    clearTimeout(timer);
    for (const c of started) c.kill();
    await sleep(300);
  }
}

const serverArgs = (impl, pki, channelz = "1") => ["--impl", impl, "--pki", pki.dir, "--channelz", channelz];
const clientArgs = (impl, pki, port, channelz = "1") =>
  ["--impl", impl, "--pki", pki.dir, "--key-type", pki.keyType, "--port", String(port), "--channelz", channelz];
const cpuMs = (a, b) => (b.cpu.user + b.cpu.system - a.cpu.user - a.cpu.system) / 1000;
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

// ---------------------------------------------------------------------------
// 1. throughput

const TP = quick
  ? { reps: 1, n1k: 2000, n64k: 200, streams: 100, perStream: 50, warm: 500 }
  : { reps: 5, n1k: 30000, n64k: 2000, streams: 100, perStream: 300, warm: 5000 };
const TP_CASES = [
  { case: "1 stream, 1 KiB", streams: 1, conns: 1, perStream: TP.n1k, size: 1024 },
  { case: "1 stream, 64 KiB", streams: 1, conns: 1, perStream: TP.n64k, size: 65536 },
  { case: "100 streams / 1 conn, 64 B", streams: TP.streams, conns: 1, perStream: TP.perStream, size: 64 },
  { case: "100 streams / 100 conns, 64 B", streams: TP.streams, conns: TP.streams, perStream: TP.perStream, size: 64 },
];

/** One case: fresh server + client process, warm-up, then TP.reps timed repetitions. */
async function throughput(impl, pki, c) {
  return bounded(`throughput ${impl} ${c.case}`, async (spawn) => {
    const server = await spawn("server.mjs", serverArgs(impl, pki), `${impl}-server`);
    const client = await spawn("client.mjs", clientArgs(impl, pki, server.port), `${impl}-client`);
    const tmo = 20_000;
    const warmN = Math.max(50, Math.ceil((TP.warm * 1024) / Math.max(1024, c.size) / c.streams));
    await client.call("streams", { ...c, perStream: warmN, timeoutMs: tmo });
    const reps = [];
    for (let r = 0; r < TP.reps; r++) {
      const s0 = await server.call("cpu");
      const x = await client.call("streams", { ...c, timeoutMs: tmo });
      const s1 = await server.call("cpu");
      reps.push({
        ms: x.ms, msgsPerSec: x.messages / (x.ms / 1000), mibPerSec: x.bytes / 1048576 / (x.ms / 1000),
        serverCpuUsPerMsg: (cpuMs(s0, s1) * 1000) / x.messages, clientCpuUsPerMsg: (x.clientCpuMs * 1000) / x.messages,
      });
    }
    const med = reps.find((r) => r.msgsPerSec === median(reps.map((x) => x.msgsPerSec)));
    const mm = reps.map((r) => r.msgsPerSec);
    console.log(`  ${impl.padEnd(8)} ${c.case.padEnd(30)} ${fmt(med.msgsPerSec, 0).padStart(8)} msg/s ${fmt(med.mibPerSec, 1).padStart(7)} MiB/s` +
      `  (reps ${fmt(Math.min(...mm), 0)}..${fmt(Math.max(...mm), 0)})  server ${fmt(med.serverCpuUsPerMsg, 1)} µs/msg`);
    return { impl, keyType: pki.keyType, ...c, messages: c.streams * c.perStream, reps, median: med };
  });
}

// ---------------------------------------------------------------------------
// 2. idle streams: memory per stream and connect rate

const OPEN_CONCURRENCY = 32; // handshakes in flight per client process

async function idleRun(impl, pki, K, { channelz = "1", label = impl } = {}) {
  return bounded(`idle ${label} ${pki.keyType} K=${K}`, async (spawn, deadline) => {
    const server = await spawn("server.mjs", serverArgs(impl, pki, channelz), `${label}-server`);
    const nClients = 2;
    const clients = [];
    for (let i = 0; i < nClients; i++) clients.push(await spawn("client.mjs", clientArgs(impl, pki, server.port, channelz), `${label}-client${i}`));
    const per = Math.ceil(K / nClients);
    // warm-up: load and JIT every code path on both sides, then drop it
    await Promise.all(clients.map((c, i) => c.call("prepare-idle", { prefix: `warm${i}`, count: 50 })));
    await Promise.all(clients.map((c) => c.call("open-idle", { concurrency: 16, timeoutMs: 15_000 })));
    await Promise.all(clients.map((c) => c.call("close-idle")));
    await Promise.all(clients.map((c, i) => c.call("prepare-idle", { prefix: `host-${i}`, count: Math.min(per, K - i * per) })));
    await sleep(1000);
    const sBefore = await server.call("mem");
    const cBefore = await Promise.all(clients.map((c) => c.call("mem")));
    const opened = await Promise.all(clients.map((c) => c.call("open-idle", { concurrency: OPEN_CONCURRENCY, timeoutMs: Math.max(5_000, deadline - Date.now() - 10_000) })));
    const sOpened = await server.call("cpu");
    await sleep(1500);
    const sAfter = await server.call("mem");
    const cAfter = await Promise.all(clients.map((c) => c.call("mem")));
    const ok = opened.reduce((a, o) => a + o.ok, 0);
    const failed = opened.reduce((a, o) => a + o.failed, 0);
    const cut = opened.reduce((a, o) => a + o.cut, 0);
    const openMs = Math.max(...opened.map((o) => o.ms));
    const d = (a, b, k) => b.mem[k] - a.mem[k];
    const streamsOpen = sAfter.counters.open;
    const per1 = (v) => (streamsOpen > 0 ? v / streamsOpen : NaN);
    const clientDelta = (k) => cAfter.reduce((a, c, i) => a + d(cBefore[i], c, k), 0) / Math.max(1, ok);
    const r = {
      impl, label, keyType: pki.keyType, K, ok, failed, cutAtDeadline: cut, firstError: opened.find((o) => o.firstError)?.firstError,
      serverStreamsOpen: streamsOpen, serverConnections: sAfter.connections,
      peerMismatch: sAfter.counters.peerMismatch, noPeerCert: sAfter.counters.noPeerCert,
      connectMs: openMs, connsPerSec: ok / (openMs / 1000),
      handshakeP50Ms: median(opened.map((o) => o.p50)), handshakeP99Ms: Math.max(...opened.map((o) => o.p99)),
      serverCpuMsPerConn: cpuMs(sBefore, sOpened) / Math.max(1, ok),
      clientCpuMsPerConn: opened.reduce((a, o) => a + o.cpuMs, 0) / Math.max(1, ok),
      server: {
        before: sBefore.mem, after: sAfter.mem,
        rssPerStream: per1(d(sBefore, sAfter, "rss")), heapPerStream: per1(d(sBefore, sAfter, "heapUsed")),
        externalPerStream: per1(d(sBefore, sAfter, "external")),
      },
      client: {
        processes: nClients,
        rssPerStream: clientDelta("rss"), heapPerStream: clientDelta("heapUsed"), externalPerStream: clientDelta("external"),
      },
    };
    console.log(`  ${label.padEnd(18)} ${pki.keyType} K=${String(K).padEnd(5)} open ${ok}/${K} in ${fmt(openMs / 1000, 1)} s (${fmt(r.connsPerSec, 0)}/s)` +
      `  server/stream: rss ${kb(r.server.rssPerStream)} heap ${kb(r.server.heapPerStream)}` +
      `  client/stream: rss ${kb(r.client.rssPerStream)} heap ${kb(r.client.heapPerStream)}`);
    await Promise.all(clients.map((c) => c.call("close-idle").catch(() => {})));
    return r;
  });
}

// ---------------------------------------------------------------------------

const fmt = (v, d) => (Number.isFinite(v) ? v.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d }) : "—");
const kb = (v) => (Number.isFinite(v) ? `${fmt(v / 1024, 1)} KiB` : "—");

console.log(`link-transport bench: node ${process.version}, ${os.cpus().length} cores, ${os.cpus()[0]?.model}`);
console.log(`  ${Object.entries(versions).map(([k, v]) => `${k} ${v}`).join(", ")}`);
buildGen();
const { makePki } = await import("./certs.mjs");
const pkis = { ec: makePki("ec"), rsa: makePki("rsa") };

const results = { throughput: [], idle: [] };
if (!opt["no-throughput"]) {
  console.log("\n# throughput (EC P-256 certs)");
  for (const c of TP_CASES) for (const impl of impls) results.throughput.push(await throughput(impl, pkis.ec, c));
}
if (!opt["no-idle"]) {
  console.log("\n# idle streams (one TLS connection + one stream per daemon identity)");
  const idleImpls = opt["no-floor"] ? impls : [...impls, "node-http2"];
  for (const K of idleKs) for (const impl of idleImpls) results.idle.push(await idleRun(impl, pkis.ec, K));
  for (const K of rsaKs) for (const impl of impls) results.idle.push(await idleRun(impl, pkis.rsa, K));
  if (impls.includes("grpcjs")) {
    for (const K of idleKs.slice(0, 1)) results.idle.push(await idleRun("grpcjs", pkis.ec, K, { channelz: "0", label: "grpcjs-nochannelz" }));
  }
  for (const K of bigKs) for (const impl of impls) results.idle.push(await idleRun(impl, pkis.ec, K));
}

// ---------------------------------------------------------------------------
// report

console.log("\n## Throughput (median of reps; MiB/s of chunk data; CPU = µs per message)");
console.log("| case | impl | msgs/s median (min–max) | MiB/s | server CPU µs/msg | client CPU µs/msg | other load |");
console.log("|---|---|---:|---:|---:|---:|---:|");
for (const t of results.throughput) {
  if (t.error || t.skipped) { console.log(`| ${t.name} | | failed: ${t.error ?? t.skipped} | | | |`); continue; }
  const m = t.median;
  const mm = t.reps.map((r) => r.msgsPerSec);
  console.log(`| ${t.case} | ${t.impl} | ${fmt(m.msgsPerSec, 0)} (${fmt(Math.min(...mm), 0)}–${fmt(Math.max(...mm), 0)}) | ${fmt(m.mibPerSec, 1)} | ${fmt(m.serverCpuUsPerMsg, 1)} | ${fmt(m.clientCpuUsPerMsg, 1)} | ${fmt(t.otherLoadCores, 2)} |`);
}
console.log("\n## Idle streams (per stream = delta / streams open; server after global.gc())");
console.log("| impl | certs | K | streams open | server RSS/stream | server heap/stream | client RSS/stream | client heap/stream | conns/s | server CPU ms/conn | client CPU ms/conn | other load |");
console.log("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
for (const r of results.idle) {
  if (r.error || r.skipped) { console.log(`| ${r.name} | | | failed: ${r.error ?? r.skipped} | | | | | | | | |`); continue; }
  console.log(`| ${r.label} | ${r.keyType === "ec" ? "EC P-256" : "RSA 2048"} | ${r.K} | ${r.serverStreamsOpen} | ${kb(r.server.rssPerStream)} | ${kb(r.server.heapPerStream)} | ${kb(r.client.rssPerStream)} | ${kb(r.client.heapPerStream)} | ${fmt(r.connsPerSec, 0)} | ${fmt(r.serverCpuMsPerConn, 1)} | ${fmt(r.clientCpuMsPerConn, 1)} | ${fmt(r.otherLoadCores, 2)} |`);
}

const done = results.idle.filter((r) => !r.error && !r.skipped);
const bad = done.filter((r) => r.peerMismatch || r.noPeerCert || r.failed);
console.log(bad.length === 0
  ? "\npeer identity: in every idle run each hello's host_id equalled the CN of the client certificate the server read; no handshake or stream failed"
  : `\nPROBLEMS: ${bad.map((r) => `${r.name}: mismatch ${r.peerMismatch}, no cert ${r.noPeerCert}, failed ${r.failed} (${r.firstError ?? ""})`).join("; ")}`);
for (const r of done.filter((x) => x.serverStreamsOpen < x.K)) {
  console.log(`partial: ${r.name}: ${r.serverStreamsOpen} of ${r.K} streams open when the open phase hit its deadline; per-stream figures divide by ${r.serverStreamsOpen}`);
}
for (const r of results.idle.filter((x) => x.error || x.skipped)) console.log(`not measured: ${r.name}: ${r.error ?? r.skipped}`);

const versionsAtEnd = Object.fromEntries(Object.keys(versions).map((k) => [k, k === "node" ? process.version : libVersion(k)]));
if (JSON.stringify(versionsAtEnd) !== JSON.stringify(versions)) {
  console.log(`\nWARNING: installed packages changed during the run: ${JSON.stringify(versions)} -> ${JSON.stringify(versionsAtEnd)}`);
}

const out = {
  date: new Date().toISOString(),
  machine: { cores: os.cpus().length, cpu: os.cpus()[0]?.model, memGiB: +(os.totalmem() / 2 ** 30).toFixed(1), platform: `${os.platform()} ${os.release()}` },
  versions, versionsAtEnd, quick, command: `node ${relative(root, fileURLToPath(import.meta.url))} ${process.argv.slice(2).join(" ")}`.trim(),
  settings: { throughput: TP, idleKs, rsaKs, bigKs, runLimitMs: RUN_LIMIT_MS },
  results,
};
mkdirSync(dirname(opt.out), { recursive: true });
writeFileSync(opt.out, JSON.stringify(out, null, 2) + "\n");
console.log(`\nwrote ${relative(process.cwd(), opt.out)} in ${fmt((Date.now() - suiteStart) / 1000, 0)} s`);
for (const p of Object.values(pkis)) rmSync(p.dir, { recursive: true, force: true });
