// node bench/micro/proxy-ping.mjs [DIST_DIR] [--hosts 2000] [--rounds 20]: µs of CPU per host of a fleet-wide
// ping at a proxy, in one process, without TLS, HTTP/2 or gRPC: a ProxyCore (memory store) holding HOSTS hosts on
// in-memory links, the controller's frame of HOSTS ping tasks decoded from its bytes, each host's task encoded down,
// each host's answer decoded up, the statuses encoded up to the controller and its acknowledgements decoded back;
// every frame through the codecs the proxy's transports use (the hand codecs where DIST_DIR has them, else
// protobuf-es as connect-es and grpc-js called it). What is left out is what a whole run adds per host: the
// transports (TLS, nghttp2, grpc-js, connect-es's stream), the kernel, and the idle hosts.
// DIST_DIR defaults to this worktree's dist/ (npm run build first); give another build's to compare (A/B in one
// process kind, alternate them).
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const args = process.argv.slice(2);
const opt = (k, d) => (args.includes(k) ? Number(args[args.indexOf(k) + 1]) : d);
const dist = resolve(args[0] && !args[0].startsWith("--") ? args[0] : new URL("../../dist", import.meta.url).pathname);
const HOSTS = opt("--hosts", 2000);
const ROUNDS = opt("--rounds", 20);
const load = (p) => import(pathToFileURL(`${dist}/${p}`).href);

const { ProxyCore } = await load("proxy/proxy.js");
const { MemoryProxyStore } = await load("proxy/store.js");
const { systemClock } = await load("common/clock.js");
const { silentLogger } = await load("common/logger.js");
const { AsyncQueue } = await load("common/async-queue.js");
const { SpecEncoder } = await load("common/task-signing.js");
const { ackRunsOf, statusesOfRuns } = await load("common/status-runs.js");
const { encodeWithWireOutput } = await load("common/output-wire.js");
const { decodeAgentRequest, encodeAgentResponse } = await load("common/agent-link-wire.js");
const pb = await load("gen/rexmesh/v1/proxy_link_pb.js");
const ab = await load("gen/rexmesh/v1/agent_link_pb.js");
const tk = await load("gen/rexmesh/v1/task_pb.js");
const hand = existsSync(`${dist}/common/proxy-link-wire.js`) ? await load("common/proxy-link-wire.js") : undefined;
// The controller link's codecs at the proxy: by hand, or as connect-es called protobuf-es (with output in wire form).
const decodeDown = hand ? hand.decodeProxyResponse : (b) => fromBinary(pb.ProxyStreamResponseSchema, b);
const encodeUp = hand ? hand.encodeProxyRequest : encodeWithWireOutput(pb.ProxyStreamRequestSchema);

/** A link whose frames are handed to `onSent` as they are sent; its peer's frames are delivered into it. */
class Link {
  constructor(onSent) {
    this.queue = new AsyncQueue();
    this.incoming = this.queue;
    this.backlog = 0;
    this.onSent = onSent;
    this.closed = new Promise(() => {});
  }
  send(frame) {
    this.onSent(frame);
  }
  whenWritable() {
    return Promise.resolve();
  }
  close() {
    this.queue.close();
  }
  deliver(frame) {
    this.queue.push(frame);
  }
}

const core = new ProxyCore({ name: "px1", region: "eu", clock: systemClock, store: new MemoryProxyStore(), log: silentLogger, heartbeatMs: 60_000 });
core.start();

let answered = 0;
let onRoundDone;
const controller = new Link((frame) => {
  encodeUp(frame);
  // The controller's side (the same in both builds; in the figure): its acknowledgements in runs, encoded.
  const statuses = [...statusesOfRuns(frame.statusRuns), ...frame.statuses];
  if (statuses.length === 0) return;
  answered += statuses.filter((s) => s.state === tk.TaskState.SUCCEEDED).length;
  const acks = toBinary(pb.ProxyStreamResponseSchema, create(pb.ProxyStreamResponseSchema, { statusAckRuns: ackRunsOf(statuses) }));
  controller.deliver(decodeDown(acks));
  if (answered >= HOSTS) onRoundDone?.();
});
void core.serveController(controller);
controller.deliver(decodeDown(toBinary(pb.ProxyStreamResponseSchema, create(pb.ProxyStreamResponseSchema, { welcome: { heartbeatMs: 60_000, presenceNonce: new Uint8Array(16), features: ["status-runs"] } }))));

const hostId = (i) => `host-${String(i).padStart(5, "0")}`;
/** Each host's answer to this round's ping, as a daemon encodes it: made before the round is timed. */
let answers = [];
const hosts = [];
for (let i = 0; i < HOSTS; i++) {
  const id = hostId(i);
  const link = new Link((frame) => {
    encodeAgentResponse(frame);
    // The host's side: it answers its ping at once.
    if (frame.tasks.length > 0) link.deliver(decodeAgentRequest(answers[i]));
  });
  hosts.push(link);
  void core.serveHost(link, { role: "host", scope: "acme", id });
  link.deliver(decodeAgentRequest(toBinary(ab.AgentStreamRequestSchema, create(ab.AgentStreamRequestSchema, { hello: { hostId: id, heartbeatMs: 60_000 }, credits: 64 }))));
}

// The controller's frames of ping tasks, encoded once per round as the controller encodes them (a job's part once).
const encoder = new SpecEncoder();
const ping = [{ $typeName: "rexmesh.v1.Step", name: "", tool: { case: "ping", value: { $typeName: "rexmesh.v1.PingTool" } } }];
function answersOf(jobId) {
  const time = timestampFromMs(Date.now());
  return hosts.map((_, i) => toBinary(ab.AgentStreamRequestSchema, create(ab.AgentStreamRequestSchema, { statuses: [{ taskId: `${jobId}-${String(i).padStart(5, "0")}`, state: tk.TaskState.SUCCEEDED, time, exitCode: 0, message: "pong" }], credits: 64 })));
}

function roundFrame(round) {
  const jobId = `01JF3Z8W4K7M2N5P9Q1RJ${String(round).padStart(5, "0")}`;
  const base = { jobId, tenant: "acme", steps: ping, deliverBy: timestampFromMs(Date.now() + 600_000), createdAt: timestampFromMs(Date.now()) };
  answers = answersOf(jobId);
  const tasks = [];
  for (let i = 0; i < HOSTS; i++) {
    const spec = create(tk.TaskSpecSchema, { ...base, taskId: `${jobId}-${String(i).padStart(5, "0")}`, hostId: hostId(i) });
    tasks.push({ $typeName: "rexmesh.v1.SignedTask", spec: encoder.encode(spec), signature: new Uint8Array(0), keyId: "" });
  }
  // Frames of at most 1,000 tasks, as the controller sends in slices.
  const frames = [];
  for (let i = 0; i < tasks.length; i += 1000) frames.push(toBinary(pb.ProxyStreamResponseSchema, create(pb.ProxyStreamResponseSchema, { tasks: tasks.slice(i, i + 1000) })));
  return frames;
}

const settle = () => new Promise((r) => setImmediate(r));
async function round(r) {
  const frames = roundFrame(r);
  answered = 0;
  const done = new Promise((res) => (onRoundDone = res));
  const t0 = process.cpuUsage();
  for (const f of frames) controller.deliver(decodeDown(f));
  await done;
  for (let i = 0; i < 5; i++) await settle();
  const t = process.cpuUsage(t0);
  return (t.user + t.system) / HOSTS;
}

await settle();
for (let r = 0; r < 3; r++) await round(r);
const us = [];
for (let r = 3; r < 3 + ROUNDS; r++) us.push(await round(r));
us.sort((a, b) => a - b);
const q = (f) => us[Math.floor(f * (us.length - 1))].toFixed(1);
console.log(`${dist} (${hand ? "controller link by hand" : "controller link by protobuf-es"}): ${HOSTS} hosts, ${ROUNDS} rounds: µs of CPU per host min ${q(0)} median ${q(0.5)} p90 ${q(0.9)} (load ${(await import("node:os")).loadavg()[0].toFixed(1)})`);
process.exit(0);
