// The client side of the link-transport benchmark (simulated daemons).
// Driven by run.mjs over the IPC channel of child_process.fork.
//
//   node --expose-gc client.mjs --impl connect|grpcjs|node-http2 --pki DIR --key-type ec|rsa --port N [--channelz 0|1]
import { once } from "node:events";
import http2 from "node:http2";
import tls from "node:tls";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { parseArgs } from "node:util";
import * as grpc from "@grpc/grpc-js";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { IdentityMinter, loadPki } from "./certs.mjs";
import {
  AgentLinkService, AgentStreamRequestSchema, AgentStreamResponseSchema, METHOD_PATH,
  agentStreamMethod, chunkFrame, grpcDeframer, grpcFrame, helloFrame, memSnapshot,
} from "./common.mjs";

const { values: opt } = parseArgs({
  options: {
    impl: { type: "string" },
    pki: { type: "string" },
    "key-type": { type: "string", default: "ec" },
    port: { type: "string" },
    channelz: { type: "string", default: "1" },
  },
});
const pki = loadPki(opt.pki);
const minter = new IdentityMinter(opt.pki, opt["key-type"]);
const target = `127.0.0.1:${opt.port}`;
const grpcOptions = opt.channelz === "0" ? { "grpc.enable_channelz": 0 } : {};

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

// ---------------------------------------------------------------------------
// One connection (one daemon identity) and streams on it, per implementation.
//
// openStream(hostId, { n, data, startGate, taskId }) sends hello, resolves
// `welcomed` on the welcome; after startGate resolves it sends n output frames
// (one OutputChunk each) and resolves `done` with the time the n-th ack came.
// With n = 0 the stream stays open (idle) until close().

function grpcConn(identity) {
  const creds = grpc.credentials.createFromSecureContext(identity.secureContext);
  const client = new grpc.Client(target, creds, grpcOptions);
  const calls = [];
  return {
    openStream(hostId, { n = 0, data, startGate, taskId = "task-1" } = {}) {
      const welcomed = deferred();
      const done = deferred();
      const call = client.makeBidiStreamRequest(METHOD_PATH, agentStreamMethod.requestSerialize, agentStreamMethod.responseDeserialize);
      calls.push(call);
      let acks = 0;
      call.on("data", (res) => {
        if (res.welcome) { welcomed.resolve(); return; }
        acks += res.outputAcks.length;
        if (acks >= n) {
          done.resolve(performance.now());
          call.end();
        }
      });
      call.on("error", (err) => {
        if (err.code === grpc.status.CANCELLED) return;
        welcomed.reject(err); done.reject(err);
      });
      call.write(helloFrame(hostId));
      if (n > 0) {
        (async () => {
          await welcomed.promise;
          await startGate;
          for (let i = 1; i <= n; i++) {
            if (!call.write(chunkFrame(taskId, i, data))) await once(call, "drain");
          }
        })().catch((e) => done.reject(e));
      }
      return { welcomed: welcomed.promise, done: done.promise };
    },
    close() {
      for (const c of calls) c.cancel();
      client.close();
    },
  };
}

function connectConn(identity) {
  const nodeOptions = { secureContext: identity.secureContext };
  // An explicit session manager only so that close() can drop the connection;
  // createGrpcTransport makes the same one internally otherwise.
  const sessionManager = new Http2SessionManager(`https://${target}`, {}, nodeOptions);
  const transport = createGrpcTransport({ baseUrl: `https://${target}`, sessionManager });
  const client = createClient(AgentLinkService, transport);
  const aborts = [];
  return {
    openStream(hostId, { n = 0, data, startGate, taskId = "task-1" } = {}) {
      const welcomed = deferred();
      const done = deferred();
      const release = deferred();
      const ac = new AbortController();
      aborts.push(() => { release.resolve(); ac.abort(); });
      async function* requests() {
        yield helloFrame(hostId);
        if (n > 0) {
          await welcomed.promise;
          await startGate;
          for (let i = 1; i <= n; i++) yield chunkFrame(taskId, i, data);
        }
        await release.promise; // half-close only when all acks are in (or on close)
      }
      (async () => {
        let acks = 0;
        for await (const res of client.agentStream(requests(), { signal: ac.signal })) {
          if (res.welcome) { welcomed.resolve(); continue; }
          acks += res.outputAcks.length;
          if (acks >= n) { done.resolve(performance.now()); release.resolve(); }
        }
      })().catch((err) => {
        if (ac.signal.aborted) return;
        welcomed.reject(err); done.reject(err);
      });
      return { welcomed: welcomed.promise, done: done.promise };
    },
    close() {
      for (const a of aborts) a();
      sessionManager.abort();
    },
  };
}

// Floor: node:http2 with hand-written gRPC framing (idle streams only).
function nodeHttp2Conn(identity) {
  const session = http2.connect(`https://${target}`, { secureContext: identity.secureContext });
  session.on("error", () => {});
  return {
    openStream(hostId, { n = 0 } = {}) {
      if (n > 0) throw new Error("node-http2 floor supports idle streams only");
      const welcomed = deferred();
      const req = session.request({ ":method": "POST", ":path": METHOD_PATH, "content-type": "application/grpc", te: "trailers" });
      req.on("data", grpcDeframer((bytes) => {
        if (fromBinary(AgentStreamResponseSchema, bytes).welcome) welcomed.resolve();
      }));
      req.on("error", (e) => welcomed.reject(e));
      req.write(grpcFrame(toBinary(AgentStreamRequestSchema, helloFrame(hostId))));
      return { welcomed: welcomed.promise, done: welcomed.promise };
    },
    close() { session.destroy(); },
  };
}

const makeConn = { connect: connectConn, grpcjs: grpcConn, "node-http2": nodeHttp2Conn }[opt.impl];

function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: timed out after ${ms} ms`)), ms); }),
  ]).finally(() => clearTimeout(t));
}

// ---------------------------------------------------------------------------
// Scenarios

// A daemon builds its TLS context once; so does the simulator, outside the
// timed and measured windows.
const withContext = (id) => ({ ...id, secureContext: tls.createSecureContext({ ca: pki.ca, key: id.key, cert: id.cert }) });
const baseIdentity = withContext({ key: pki.clientKey, cert: pki.clientCert, hostId: "host-client" });

/** S streams over C connections (C = 1 or C = S), each sending perStream frames of `size` bytes. */
async function streams({ streams: S, conns: C, perStream, size, timeoutMs }) {
  const data = new Uint8Array(size).fill(0x61);
  const ids = C === 1 ? [baseIdentity] : Array.from({ length: C }, (_, i) => withContext(minter.mint(`host-tp-${i}`)));
  const conns = ids.map((id) => ({ conn: makeConn(id), hostId: id.hostId }));
  const gate = deferred();
  try {
    const st = [];
    for (let s = 0; s < S; s++) {
      const { conn, hostId } = conns[s % C];
      st.push(conn.openStream(hostId, { n: perStream, data, startGate: gate.promise, taskId: `task-${s}` }));
    }
    await withTimeout(Promise.all(st.map((x) => x.welcomed)), timeoutMs, "welcome");
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    gate.resolve();
    const ends = await withTimeout(Promise.all(st.map((x) => x.done)), timeoutMs, "acks");
    const t1 = Math.max(...ends);
    const cpu = process.cpuUsage(cpu0);
    return { ms: t1 - t0, messages: S * perStream, bytes: S * perStream * size, clientCpuMs: (cpu.user + cpu.system) / 1000 };
  } finally {
    for (const { conn } of conns) conn.close();
  }
}

// Idle streams: one connection + one stream per identity.
let idle = { identities: [], conns: [] };

function prepareIdle({ prefix, count }) {
  idle.identities = Array.from({ length: count }, (_, i) => withContext(minter.mint(`${prefix}-${i}`)));
  return { minted: count };
}

async function openIdle({ concurrency, timeoutMs }) {
  const ids = idle.identities;
  const latencies = [];
  let next = 0, failed = 0, cut = 0, firstError;
  const deadline = Date.now() + timeoutMs;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  async function worker() {
    while (next < ids.length && Date.now() < deadline) {
      const id = ids[next++];
      const c = makeConn(id);
      idle.conns.push(c);
      const s0 = performance.now();
      try {
        await withTimeout(c.openStream(id.hostId).welcomed, Math.max(1000, Math.min(20_000, deadline - Date.now())), "welcome");
        latencies.push(performance.now() - s0);
      } catch (e) {
        // A handshake still in flight when the phase deadline passes is "cut", not failed.
        if (Date.now() >= deadline - 50) cut++;
        else { failed++; firstError ??= String(e?.message ?? e); }
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  const ms = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  latencies.sort((a, b) => a - b);
  const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))];
  return { ms, ok: latencies.length, failed, cut, firstError, p50: pct(0.5), p99: pct(0.99), cpuMs: (cpu.user + cpu.system) / 1000 };
}

function closeIdle() {
  for (const c of idle.conns) c.close();
  const n = idle.conns.length;
  idle = { identities: [], conns: [] };
  return { closed: n };
}

process.on("message", async (msg) => {
  try {
    let r;
    switch (msg.cmd) {
      case "streams": r = await streams(msg); break;
      case "prepare-idle": r = prepareIdle(msg); break;
      case "open-idle": r = await openIdle(msg); break;
      case "close-idle": r = closeIdle(); break;
      case "mem": r = { mem: await memSnapshot() }; break;
      case "stop": process.exit(0);
    }
    process.send({ id: msg.id, ...r });
  } catch (e) {
    process.send({ id: msg.id, error: String(e?.stack ?? e) });
  }
});
process.on("disconnect", () => process.exit(0));
process.send({ ready: true, pid: process.pid });
