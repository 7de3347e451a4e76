// node bench/micro/end-check.mjs: µs of CPU per task end, as the controller checks it
// (HostKeyVerifier.checkEnd) and as the daemon vouches for it (HostReporter.signEnd): an
// Ed25519 signature against an HMAC under the key agreed once per host and controller X25519
// key (common/end-mac.ts); and that agreement's one-off cost per host at the controller. The
// code as built in dist/ (npm run build first). Real keys, real certificates from a throwaway CA.
import { create } from "@bufbuild/protobuf";
import { createCa, generateKeyPair, issueCertificate } from "../../dist/certs/ca.js";
import { HostKeyVerifier, HostReporter, OutputDigest } from "../../dist/common/host-signing.js";
import { TaskSigner, TaskVerifier } from "../../dist/common/task-signing.js";
import { EndKeyRing, MemoryEndKeyStore } from "../../dist/controller/end-keys.js";
import { TaskState, TaskStatusSchema } from "../../dist/gen/rexmesh/v1/task_pb.js";

const HOSTS = 500;
const clock = { now: () => Date.now() };
const ca = createCa({ clock });
const keys = generateKeyPair();
const creds = (identity) => ({ certPem: issueCertificate(ca, { clock, identity, publicKeyPem: keys.publicKeyPem, validityMs: 86_400_000 }), keyPem: keys.privateKeyPem, caPem: ca.certPem });
const ring = await EndKeyRing.open(new MemoryEndKeyStore(), clock);
const signer = new TaskSigner(creds({ role: "controller", scope: "mesh", id: "ctl" }), clock, undefined, ring.current.publicKey);
const daemonKeys = new TaskVerifier(ca.certPem, clock);
daemonKeys.addKeys([signer.key]);
const endKey = daemonKeys.endKey();

const hosts = Array.from({ length: HOSTS }, (_, i) => {
  const identity = { role: "host", scope: "acme", id: `host-${String(i).padStart(5, "0")}` };
  return { identity, reporter: new HostReporter(creds(identity), clock, identity) };
});
const digest = new OutputDigest();
digest.add(Buffer.from("hello\n"));
const sha = digest.digest();
const end = (i, round) => create(TaskStatusSchema, { taskId: `t-${round}-${i}-4f1c2a9e`, state: TaskState.SUCCEEDED, exitCode: 0, outputChunks: 1n, outputBytes: 6n, outputSha256: sha });

function verifier() {
  const v = new HostKeyVerifier(ca.certPem, clock, () => false, undefined, { controllerKeys: (id) => ring.get(id) });
  for (const h of hosts) if (!v.accept(h.reporter.key, h.identity).ok) throw new Error("a report key was refused");
  return v;
}

/** Best of `rounds` of `fn` over every host, in µs per host. */
function time(label, rounds, fn) {
  let best = Infinity;
  for (let r = 0; r < rounds; r++) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < HOSTS; i++) fn(i, r);
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1000 / HOSTS);
  }
  console.log(`${label.padEnd(58)} ${best.toFixed(2).padStart(7)} µs per end (best of ${rounds})`);
  return best;
}

const signed = hosts.map((h, i) => { const s = end(i, 0); h.reporter.signEnd(s); return s; });
const macd = hosts.map((h, i) => { const s = end(i, 0); h.reporter.signEnd(s, endKey); return s; });
const check = (v, list) => (i) => { if (v.checkEnd(list[i], hosts[i].identity) !== "ok") throw new Error("an end did not check out"); };

const v = verifier();
const sig = time("controller: checkEnd, Ed25519 signature", 10, check(v, signed));
// The first MAC'd end of each host agrees its key (X25519 + HKDF), once per host and controller key.
const first = time("controller: checkEnd, first MAC'd end of a host (agreement)", 1, check(verifier(), macd));
const mac = time("controller: checkEnd, MAC (key agreed before)", 10, check(v, macd));
const daemonSig = time("daemon: signEnd, Ed25519", 10, (i, r) => hosts[i].reporter.signEnd(end(i, r)));
const daemonMac = time("daemon: signEnd, MAC (key agreed before)", 10, (i, r) => hosts[i].reporter.signEnd(end(i, r), endKey));
console.log(`controller per end: ${(sig / mac).toFixed(0)}x less with the MAC; the agreement once per host costs ${first.toFixed(0)} µs; daemon per end: ${(daemonSig / daemonMac).toFixed(0)}x`);
