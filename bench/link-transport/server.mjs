// The server side of the link-transport benchmark: one process, one
// AgentLinkService implementation (connect-node or grpc-js) on 127.0.0.1 with
// mTLS required. Driven by run.mjs over the IPC channel of child_process.fork.
//
//   node --expose-gc server.mjs --impl connect|grpcjs|node-http2 --pki DIR [--channelz 0|1]
import http2 from "node:http2";
import { parseArgs } from "node:util";
import * as grpc from "@grpc/grpc-js";
import { createContextKey, createContextValues } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { loadPki } from "./certs.mjs";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  AgentLinkService, AgentStreamRequestSchema, AgentStreamResponseSchema, METHOD_PATH,
  agentStreamMethod, answer, grpcDeframer, grpcFrame, memSnapshot,
} from "./common.mjs";

const { values: opt } = parseArgs({
  options: {
    impl: { type: "string" },
    pki: { type: "string" },
    channelz: { type: "string", default: "1" },
  },
});
const pki = loadPki(opt.pki);
const counters = { hellos: 0, frames: 0, peerMismatch: 0, open: 0, opened: 0, noPeerCert: 0 };
const openPeers = new Map(); // "addr:port" -> open streams on that connection

function streamOpened(peer) {
  counters.open++; counters.opened++;
  openPeers.set(peer, (openPeers.get(peer) ?? 0) + 1);
}
function streamClosed(peer) {
  counters.open--;
  const n = (openPeers.get(peer) ?? 1) - 1;
  if (n === 0) openPeers.delete(peer); else openPeers.set(peer, n);
}

async function startConnect() {
  // The peer identity, read from the TLS socket of the HTTP/2 session.
  const kPeer = createContextKey({ cn: undefined, addr: "" }, { description: "TLS peer" });
  const handler = connectNodeAdapter({
    routes: (router) => router.service(AgentLinkService, {
      async *agentStream(requests, ctx) {
        const peer = ctx.values.get(kPeer);
        if (!peer.cn) counters.noPeerCert++;
        streamOpened(peer.addr);
        try {
          for await (const req of requests) {
            const res = answer(req, peer.cn, counters);
            if (res) yield res;
          }
        } finally {
          streamClosed(peer.addr);
        }
      },
    }),
    contextValues: (req) => {
      // For an HTTP/2 request, req.socket is a proxy of the session's TLSSocket.
      const socket = req.socket;
      const cert = socket.getPeerCertificate(); // {} when there is none
      return createContextValues().set(kPeer, {
        cn: socket.authorized ? cert.subject?.CN : undefined,
        addr: `${socket.remoteAddress}:${socket.remotePort}`,
      });
    },
  });
  const server = http2.createSecureServer({
    key: pki.serverKey, cert: pki.serverCert, ca: pki.ca,
    requestCert: true, rejectUnauthorized: true,
  }, handler);
  server.on("tlsClientError", () => { counters.tlsErrors = (counters.tlsErrors ?? 0) + 1; });
  await new Promise((resolve) => server.listen({ port: 0, host: "127.0.0.1", backlog: 4096 }, resolve));
  return server.address().port;
}

async function startGrpcJs() {
  const options = opt.channelz === "0" ? { "grpc.enable_channelz": 0 } : {};
  const server = new grpc.Server(options);
  server.addService({ agentStream: agentStreamMethod }, {
    agentStream: (call) => {
      const auth = call.getAuthContext();
      const cn = auth.sslPeerCertificate?.subject?.CN;
      if (!cn) counters.noPeerCert++;
      const peer = call.getPeer();
      streamOpened(peer);
      let closed = false;
      const close = () => { if (!closed) { closed = true; streamClosed(peer); } };
      call.on("data", (req) => {
        const res = answer(req, cn, counters);
        if (res) call.write(res);
      });
      call.on("end", () => { call.end(); close(); });
      call.on("cancelled", close);
      call.on("error", close);
    },
  });
  const creds = grpc.ServerCredentials.createSsl(pki.ca, [{ private_key: pki.serverKey, cert_chain: pki.serverCert }], true);
  return await new Promise((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", creds, (err, port) => (err ? reject(err) : resolve(port))));
}

// Floor for comparison: node:http2 with hand-written gRPC framing, no library.
async function startNodeHttp2() {
  const server = http2.createSecureServer({
    key: pki.serverKey, cert: pki.serverCert, ca: pki.ca,
    requestCert: true, rejectUnauthorized: true,
  });
  server.on("stream", (stream, headers) => {
    if (headers[":path"] !== METHOD_PATH) { stream.respond({ ":status": 404 }, { endStream: true }); return; }
    const socket = stream.session.socket;
    const cn = socket.authorized ? socket.getPeerCertificate().subject?.CN : undefined;
    if (!cn) counters.noPeerCert++;
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    streamOpened(peer);
    let responded = false;
    stream.on("data", grpcDeframer((bytes) => {
      const res = answer(fromBinary(AgentStreamRequestSchema, bytes), cn, counters);
      if (!res) return;
      if (!responded) { responded = true; stream.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true }); }
      stream.write(grpcFrame(toBinary(AgentStreamResponseSchema, res)));
    }));
    stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
    stream.on("end", () => {
      if (!responded) { responded = true; stream.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true }); }
      stream.end();
    });
    stream.on("close", () => streamClosed(peer));
    stream.on("error", () => {});
  });
  await new Promise((resolve) => server.listen({ port: 0, host: "127.0.0.1", backlog: 4096 }, resolve));
  return server.address().port;
}

const port = opt.impl === "connect" ? await startConnect()
  : opt.impl === "grpcjs" ? await startGrpcJs()
  : opt.impl === "node-http2" ? await startNodeHttp2()
  : (() => { throw new Error(`unknown impl ${opt.impl}`); })();

process.on("message", async (msg) => {
  switch (msg.cmd) {
    case "mem":
      process.send({ id: msg.id, mem: await memSnapshot(), cpu: process.cpuUsage(), counters: { ...counters }, connections: openPeers.size });
      break;
    case "cpu":
      process.send({ id: msg.id, cpu: process.cpuUsage(), counters: { ...counters }, connections: openPeers.size });
      break;
    case "heap-snapshot": // diagnostics only (not used by run.mjs)
      global.gc?.();
      process.send({ id: msg.id, file: (await import("node:v8")).writeHeapSnapshot(msg.file) });
      break;
    case "stop":
      process.exit(0);
  }
});
process.on("disconnect", () => process.exit(0));
process.send({ ready: true, port, pid: process.pid });
