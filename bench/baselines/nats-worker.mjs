// A child of nats.mjs: opens `count` NATS client connections (one TCP
// connection each, as every Choria server has its own), each subscribed to
// the common fan-out subject and to its own subject, replying to every
// request with its name. Reports over IPC: { ready, connectMs } once every
// subscription is known to the server (flush), { error } on failure. Exits
// when the parent says "stop" or goes away.
import { createSecureContext } from "node:tls";

const natsUrl = process.env.NATS_MODULE_URL;
const server = process.env.NATS_SERVER;
const subject = process.env.NATS_SUBJECT;
const first = Number(process.env.NATS_FIRST);
const count = Number(process.env.NATS_COUNT);
const batch = Number(process.env.NATS_CONNECT_BATCH ?? 200);
/**
 * Mutual TLS ({ ca, cert, key } PEM), when the server asks for it: one
 * secure context for all of this process's connections, built before they
 * start, as a simulated rexmesh host builds its own (PEM handed to each
 * connect would make Node build a context per connection, ~1.3 ms each).
 */
const tls = process.env.NATS_TLS ? { secureContext: createSecureContext(JSON.parse(process.env.NATS_TLS)) } : undefined;

const { connect } = await import(natsUrl);
const conns = [];

async function one(i) {
  const name = `h${first + i}`;
  const nc = await connect({ servers: server, name, reconnect: false, noEcho: true, timeout: 60_000, pingInterval: 600_000, ...(tls ? { tls } : {}) });
  const reply = new TextEncoder().encode(name);
  const handler = (err, msg) => {
    if (!err && msg.reply) msg.respond(reply);
  };
  nc.subscribe(subject, { callback: handler });
  nc.subscribe(`${subject}.${name}`, { callback: handler });
  conns.push(nc);
  return nc;
}

try {
  const t0 = performance.now();
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < count; i += batch) {
    const ncs = await Promise.all(Array.from({ length: Math.min(batch, count - i) }, (_, j) => one(i + j)));
    await Promise.all(ncs.map((nc) => nc.flush()));
  }
  const cpu = process.cpuUsage(cpu0);
  // CPU of the connects alone (not this process's start): what the parent counts per connection.
  process.send({ ready: true, connections: conns.length, connectMs: Math.round(performance.now() - t0), cpuMs: (cpu.user + cpu.system) / 1000 });
} catch (err) {
  process.send({ error: String(err?.message ?? err) });
}

const stop = async () => {
  await Promise.race([Promise.allSettled(conns.map((nc) => nc.close())), new Promise((r) => setTimeout(r, 3000))]);
  process.exit(0);
};
process.on("message", (m) => {
  if (m === "stop") stop();
});
process.on("disconnect", () => process.exit(0));
