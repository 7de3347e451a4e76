// Baseline: real command fan-out over SSH, pdsh against a private sshd on
// loopback.
//
// Installs openssh-server, openssh-client and pdsh from Debian when missing
// (root only), then starts its own sshd (own config, host key and
// authorized_keys in a temp dir; 127.0.0.1 and a free port only; UsePAM no;
// MaxStartups/MaxSessions raised), maps every name h* to it in a private
// ssh_config and runs
//
//   pdsh -R ssh -f 16 -w h[1-500] hostname
//
// Every "host" is a full SSH connection (key exchange, public-key auth, a
// session, the login shell running hostname) to the same machine. The
// output must hold one line per host. sshd is always stopped afterwards.
//
//   node bench/baselines/pdsh.mjs [--hosts 500] [--fanout 16] [--runs 1]
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { ensureBinaries, run } from "./install.mjs";
import { privateSshd } from "./sshd.mjs";

const log = (msg) => process.stderr.write(`  [pdsh] ${msg}\n`);
/** Runs pdsh once; → { ms, lines, hostsSeen, stderr }. */
function pdshOnce({ pdsh, hosts, fanout, sshConfig, timeoutMs }) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const env = { ...process.env, PDSH_SSH_ARGS_APPEND: `-F ${sshConfig}`, PDSH_RCMD_TYPE: "ssh" };
    const child = spawn(pdsh, ["-R", "ssh", "-f", String(fanout), "-w", `h[1-${hosts}]`, "hostname"], { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (b) => (out += b));
    child.stderr.on("data", (b) => (err += b));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const ms = performance.now() - t0;
      const lines = out.split("\n").filter(Boolean);
      const hostsSeen = new Set(lines.map((l) => l.split(":")[0])).size;
      resolve({ ms, code, signal, lines: lines.length, hostsSeen, sample: lines[0], stderr: err.trim().split("\n").slice(-3).join(" | ") });
    });
  });
}

/**
 * → { available, skipped?, hosts, fanout, runsMs, medianMs, bestMs, command }
 */
export async function pdshFanout({ hosts = 500, fanout = 16, runs = 1, timeoutMs = 600_000 } = {}) {
  const base = { hosts, fanout, command: `pdsh -R ssh -f ${fanout} -w h[1-${hosts}] hostname` };
  const bins = await ensureBinaries(["sshd", "ssh", "ssh-keygen", "pdsh"], ["openssh-server", "openssh-client", "pdsh"]);
  if (!bins.ok) return { available: false, skipped: bins.skipped, ...base };
  const sshd = await privateSshd({ tag: "pdsh", sshdPath: bins.paths.sshd, keygen: bins.paths["ssh-keygen"] });
  if (!sshd.ok) return { available: false, skipped: sshd.skipped, ...base };
  const { sshConfig, logFile } = sshd;
  try {
    // One connection first: proves the setup and warms the caches.
    const probe = await pdshOnce({ pdsh: bins.paths.pdsh, hosts: 1, fanout: 1, sshConfig, timeoutMs: 60_000 });
    if (probe.lines !== 1) return { available: false, skipped: `pdsh/ssh to the private sshd failed: ${probe.stderr || `exit ${probe.code}`}; sshd log: ${readFileSync(logFile, "utf8").trim().split("\n").slice(-2).join(" | ")}`, ...base };
    const runsMs = [];
    for (let r = 0; r < runs; r++) {
      log(`${base.command} (run ${r + 1}/${runs})`);
      const res = await pdshOnce({ pdsh: bins.paths.pdsh, hosts, fanout, sshConfig, timeoutMs });
      if (res.hostsSeen !== hosts || res.lines !== hosts) throw new Error(`pdsh run ${r + 1}: ${res.lines} lines from ${res.hostsSeen} hosts, expected ${hosts} (exit ${res.signal ?? res.code}; ${res.stderr})`);
      runsMs.push(Math.round(res.ms));
    }
    const sorted = [...runsMs].sort((a, b) => a - b);
    return {
      available: true,
      ...base,
      runsMs,
      medianMs: sorted[Math.floor(sorted.length / 2)],
      bestMs: sorted[0],
      sample: probe.sample,
      ssh: (await run(bins.paths.ssh, ["-V"], { timeoutMs: 10_000 })).stderr.trim(),
      note: "every host is a full SSH connection (key exchange, ed25519 auth, a session, the login shell) to a private sshd on 127.0.0.1",
    };
  } finally {
    await sshd.stop();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const arg = (n, d) => {
    const i = process.argv.indexOf(`--${n}`);
    return i < 0 ? d : Number(process.argv[i + 1]);
  };
  const r = await pdshFanout({ hosts: arg("hosts", 500), fanout: arg("fanout", 16), runs: arg("runs", 1) });
  process.stdout.write(JSON.stringify(r, null, 2) + "\n");
}
