// Sessions through the mesh, beside ssh to the same machine in the same run.
//
// Part A (port-forward throughput): a TCP server on the host's loopback sends
// N MB of random bytes to each connection; a client here reads them through
// `rexmesh forward h1 0:127.0.0.1:PORT` (controller, proxy, daemon; sealed
// end to end) and through `ssh -N -L` to a private sshd on loopback, and
// directly. Figure: MB/s from connect to the last byte, SHA-256 checked.
// Part B (keystroke round trip): `rexmesh shell h1 -T -- cat` and
// `ssh -T h1 cat`; one byte written, the same byte read back, --rounds
// times. Figure: p50 / p99 ms.
//
//   node bench/run.mjs sessions [--mb 256] [--rounds 300]
import { spawn } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import net from "node:net";
import os from "node:os";
import { REXMESH_BIN } from "../../dist/cli/launcher.js";
import { ensureBinaries } from "../baselines/install.mjs";
import { freePort } from "../baselines/nats.mjs";
import { privateSshd } from "../baselines/sshd.mjs";
import { log, opt, pct, withMesh } from "../lib/common.mjs";

const MB = 1e6;
const BLOCK = Buffer.alloc(1 << 20);
randomFillSync(BLOCK);

/** A server that sends `bytes` (BLOCK repeated) to each connection and closes it; → { port, sha256, close() }. */
async function source(bytes) {
  const hash = createHash("sha256");
  for (let left = bytes; left > 0; left -= BLOCK.length) hash.update(left >= BLOCK.length ? BLOCK : BLOCK.subarray(0, left));
  const server = net.createServer((socket) => {
    let left = bytes;
    const more = () => {
      while (left > 0) {
        const chunk = left >= BLOCK.length ? BLOCK : BLOCK.subarray(0, left);
        left -= chunk.length;
        if (!socket.write(chunk)) return;
      }
      socket.end();
    };
    socket.on("drain", more);
    socket.on("error", () => undefined);
    more();
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { port: server.address().port, sha256: hash.digest("hex"), close: () => new Promise((r) => server.close(r)) };
}

/** Reads a whole stream from port; → { mbps, bytes, sha256 }. */
function drain(port) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const hash = createHash("sha256");
    let bytes = 0;
    const c = net.connect(port, "127.0.0.1");
    c.on("data", (d) => {
      bytes += d.length;
      hash.update(d);
    });
    c.on("end", () => {
      const s = (performance.now() - t0) / 1000;
      resolve({ mbps: +(bytes / MB / s).toFixed(1), bytes, sha256: hash.digest("hex"), seconds: +s.toFixed(2) });
    });
    c.on("error", reject);
  });
}

/** Waits until something listens on port (an ssh -L or a forward that is up). */
async function listening(port, proc, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`exited ${proc.exitCode} before listening`);
    const ok = await new Promise((res) => {
      const c = net.connect(port, "127.0.0.1");
      c.once("connect", () => (c.destroy(), res(true)));
      c.once("error", () => res(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** One byte out, the same byte back, `rounds` times through a child's stdin and stdout; → { p50, p99, mean } ms. */
async function roundTrips(child, rounds) {
  const times = [];
  let waiting;
  child.stdout.on("data", (d) => {
    if (waiting && d.includes(waiting.byte)) {
      const w = waiting;
      waiting = undefined;
      w.resolve();
    }
  });
  const once = (byte) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no echo within 10 s")), 10_000);
      waiting = { byte, resolve: () => (clearTimeout(timer), resolve()) };
      child.stdin.write(Buffer.from([byte, 10]));
    });
  // Warm-up: the session is up and the process reads.
  for (let i = 0; i < 10; i++) await once(97 + (i % 26));
  for (let i = 0; i < rounds; i++) {
    const t0 = performance.now();
    await once(97 + (i % 26));
    times.push(performance.now() - t0);
  }
  child.stdin.end();
  const r = (x) => +x.toFixed(2);
  return { p50: r(pct(times, 50)), p99: r(pct(times, 99)), mean: r(times.reduce((a, b) => a + b, 0) / times.length) };
}

function stop(child) {
  return new Promise((r) => {
    if (child.exitCode !== null) return r();
    child.once("close", r);
    child.kill("SIGINT");
    setTimeout(() => child.kill("SIGKILL"), 5000).unref();
  });
}

export default {
  name: "sessions",
  title: "port forward and keystroke round trip through controller and proxy, beside ssh",
  target: "measured beside ssh -L / ssh to the same machine (issue 13 sets no figure)",
  async run() {
    const mb = opt("mb", 256);
    const rounds = opt("rounds", 300);
    const bytes = Math.round(mb * MB);
    const src = await source(bytes);
    const result = { mb, rounds };
    try {
      const direct = await drain(src.port);
      result.direct = direct;
      log(`direct: ${direct.mbps} MB/s`);
      await withMesh({ regions: ["r1"], hosts: [{ id: "h1", region: "r1" }], controllerArgs: ["--sessions"] }, async (_client, mesh) => {
        const env = { ...process.env, ...mesh.exports() };
        const fwd = spawn(process.execPath, [REXMESH_BIN, "forward", "h1", `0:127.0.0.1:${src.port}`], { env, stdio: ["ignore", "pipe", "pipe"] });
        try {
          const port = await new Promise((resolve, reject) => {
            let out = "";
            fwd.stdout.on("data", (d) => {
              out += d;
              const m = /forwarding 127\.0\.0\.1:(\d+)/.exec(out);
              if (m) resolve(Number(m[1]));
            });
            fwd.once("close", (code) => reject(new Error(`rexmesh forward exited ${code}`)));
          });
          await drain(port); // warm-up
          result.rexmeshForward = await drain(port);
          result.rexmeshForward.verified = result.rexmeshForward.sha256 === src.sha256;
          log(`rexmesh forward: ${result.rexmeshForward.mbps} MB/s, verified ${result.rexmeshForward.verified}`);
        } finally {
          await stop(fwd);
        }
        const sh = spawn(process.execPath, [REXMESH_BIN, "shell", "h1", "-T", "--", "cat"], { env, stdio: ["pipe", "pipe", "pipe"] });
        try {
          result.rexmeshShell = await roundTrips(sh, rounds);
          log(`rexmesh shell round trip: p50 ${result.rexmeshShell.p50} ms, p99 ${result.rexmeshShell.p99} ms`);
        } finally {
          await stop(sh);
        }
      });
      const bins = await ensureBinaries(["sshd", "ssh", "ssh-keygen"], ["openssh-server", "openssh-client"]);
      const sshd = bins.ok ? await privateSshd({ tag: "sessions", sshdPath: bins.paths.sshd, keygen: bins.paths["ssh-keygen"], tcpForwarding: true }) : { ok: false, skipped: bins.skipped };
      if (!sshd.ok) {
        result.ssh = { skipped: sshd.skipped };
        log(`ssh peer skipped: ${sshd.skipped}`);
      } else {
        try {
          const lport = await freePort();
          const tunnel = spawn(bins.paths.ssh, ["-F", sshd.sshConfig, "-N", "-L", `${lport}:127.0.0.1:${src.port}`, "h1"], { stdio: ["ignore", "ignore", "pipe"] });
          try {
            await listening(lport, tunnel);
            await drain(lport);
            result.sshForward = await drain(lport);
            result.sshForward.verified = result.sshForward.sha256 === src.sha256;
            log(`ssh -L: ${result.sshForward.mbps} MB/s`);
          } finally {
            await stop(tunnel);
          }
          const sh = spawn(bins.paths.ssh, ["-F", sshd.sshConfig, "-T", "h1", "cat"], { stdio: ["pipe", "pipe", "pipe"] });
          try {
            result.sshShell = await roundTrips(sh, rounds);
            log(`ssh round trip: p50 ${result.sshShell.p50} ms, p99 ${result.sshShell.p99} ms`);
          } finally {
            await stop(sh);
          }
        } finally {
          await sshd.stop();
        }
      }
    } finally {
      await src.close();
    }
    result.notes = [
      `${mb} MB of random bytes per connection from a server on the host's loopback (the host is this machine); one connection at a time, after one warm-up. rexmesh: CLI → controller → proxy → daemon, mTLS on every hop, sealed end to end (AES-256-GCM), four Node processes on ${os.cpus().length} cores. ssh: a private sshd on 127.0.0.1 (OpenSSH, default ciphers).`,
      ``,
      `| path | forward MB/s | keystroke round trip p50 / p99 ms |`,
      `| --- | ---: | ---: |`,
      `| rexmesh (forward; shell -T cat) | ${result.rexmeshForward?.mbps ?? "–"} | ${result.rexmeshShell ? `${result.rexmeshShell.p50} / ${result.rexmeshShell.p99}` : "–"} |`,
      `| ssh (-L; -T cat) | ${result.sshForward?.mbps ?? result.ssh?.skipped ?? "–"} | ${result.sshShell ? `${result.sshShell.p50} / ${result.sshShell.p99}` : "–"} |`,
      `| direct (loopback TCP) | ${result.direct?.mbps ?? "–"} | – |`,
    ].join("\n");
    return result;
  },
  verdict(r) {
    const f = r.rexmeshForward ? `forward ${r.rexmeshForward.mbps} MB/s${r.rexmeshForward.verified ? "" : " (NOT VERIFIED)"}` : "forward not run";
    const s = r.rexmeshShell ? `keystroke p50/p99 ${r.rexmeshShell.p50}/${r.rexmeshShell.p99} ms` : "";
    const peer = r.sshForward ? `; ssh -L ${r.sshForward.mbps} MB/s, ssh ${r.sshShell?.p50}/${r.sshShell?.p99} ms` : r.ssh?.skipped ? `; ssh: ${r.ssh.skipped}` : "";
    return { figure: `${f}, ${s}${peer}`, met: undefined };
  },
  plot: (r) => [
    {
      title: "port forward, one connection (MB/s)",
      unit: "MB/s",
      bars: [
        ...(r.rexmeshForward ? [{ label: "rexmesh forward", value: r.rexmeshForward.mbps }] : []),
        ...(r.sshForward ? [{ label: "ssh -L", value: r.sshForward.mbps }] : []),
      ],
    },
    {
      title: "keystroke round trip p50 (ms)",
      unit: "ms",
      bars: [...(r.rexmeshShell ? [{ label: "rexmesh shell", value: r.rexmeshShell.p50 }] : []), ...(r.sshShell ? [{ label: "ssh", value: r.sshShell.p50 }] : [])],
    },
  ],
};
