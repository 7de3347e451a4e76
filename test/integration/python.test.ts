import { execFile } from "node:child_process";
import { writeFileSync, existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { hostIds, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

const exec = promisify(execFile);

/** Debian's system Python, where python3-grpcio installs (not a pyenv or venv python first on PATH). */
const PYTHON = "/usr/bin/python3";
const EXAMPLE = resolve(import.meta.dirname, "../../examples/python");
const APT_HINT =
  "install the Debian packages the Python example needs (.ci/run does this): " +
  "apt-get install -y python3-grpcio protobuf-compiler protobuf-compiler-grpc libprotobuf-dev";

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command; resolves with its exit code and output whatever the code. */
async function runProcess(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  try {
    const { stdout, stderr } = await exec(file, args, { env, maxBuffer: 16 << 20, timeout: 20_000 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message: string };
    if (typeof e.code !== "number") throw new Error(`${file} ${args.join(" ")}: ${e.message}`);
    return { code: e.code, stdout: e.stdout ?? "", stderr: e.stderr ?? "" };
  }
}

/** Lines of the client's output that belong to one host's command output ("host | line"). */
function outputOf(text: string, host: string): string[] {
  return text
    .split("\n")
    .filter((l) => l.startsWith(`${host} | `))
    .map((l) => l.slice(host.length + 3));
}

/**
 * The Python example in examples/python: stubs generated from
 * proto/rexmesh/v1 at test time, then the client run as a real process
 * with the system python3 against a real mesh over mTLS.
 */
describe("the generated Python client (examples/python)", () => {
  const dir = tempDir("python");
  const genDir = join(dir, "gen");
  const hosts = hostIds(3); // h01 h02 h03
  const mesh = new LocalMesh({ ca: testCa(), dir: join(dir, "mesh"), regions: ["east"], hosts: hosts.map((id) => ({ id, region: "east" })), hostsPerProcess: 3 });
  // No REXMESH_* from the outer environment; PYTHONPATH points at the freshly generated stubs.
  const baseEnv: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? "/usr/bin:/bin", LANG: "C.UTF-8", PYTHONPATH: genDir };
  const client = (args: string[], env: NodeJS.ProcessEnv = mesh.exports()) =>
    runProcess(PYTHON, [join(EXAMPLE, "rexmesh_client.py"), ...args], { ...baseEnv, ...env });

  // Never skip: without the packages every test fails, saying what to install.
  // (Kept from the hook and thrown by each test, so that every test counts as failed, not skipped.)
  let setupError: Error | undefined;
  const setupDone = () => {
    if (setupError) throw setupError;
  };

  beforeAll(async () => {
    try {
      if (!existsSync(PYTHON)) throw new Error(`${PYTHON} not found: ${APT_HINT}`);
      const probe = await runProcess(PYTHON, ["-c", "import grpc, google.protobuf"], baseEnv);
      if (probe.code !== 0) throw new Error(`${PYTHON} cannot import grpc: ${APT_HINT}\n${probe.stderr}`);
      const gen = await runProcess("bash", [join(EXAMPLE, "generate.sh"), genDir], baseEnv);
      if (gen.code !== 0) throw new Error(`examples/python/generate.sh failed: ${APT_HINT}\n${gen.stdout}${gen.stderr}`);
    } catch (err) {
      setupError = err as Error;
      return;
    }
    await mesh.start();
    await mesh.waitForHosts(hosts.length);
  });

  afterAll(() => mesh.stop());

  it("has the Python gRPC packages and generates the stubs of the public API from proto/", () => {
    setupDone();
    for (const f of ["controller_pb2.py", "controller_pb2_grpc.py", "task_pb2.py", "host_pb2.py"]) {
      expect(existsSync(join(genDir, "rexmesh", "v1", f)), f).toBe(true);
    }
  });

  it("runs on every host, streams each host's output and summarises; one failing host makes it exit non-zero", async () => {
    setupDone();
    // Each host says hello, writes to stderr, prints a line in two pieces
    // (so that it may arrive in two chunks) and h03 exits 7.
    const script = [
      'echo "hello from $REXMESH_HOST_ID"',
      'echo "warning from $REXMESH_HOST_ID" >&2',
      "printf 'split '; sleep 0.2; echo line",
      '[ "$REXMESH_HOST_ID" != h03 ] || exit 7',
    ].join("\n");
    const r = await client(["--all", "--", "/bin/sh", "-c", script]);

    expect(r.code, r.stdout + r.stderr).toBe(1);
    for (const h of hosts) {
      expect(outputOf(r.stdout, h), `${h} stdout`).toEqual([`hello from ${h}`, "split line"]);
      expect(outputOf(r.stderr, h), `${h} stderr`).toEqual([`warning from ${h}`]);
    }
    expect(r.stdout).toMatch(/^h01 {2}SUCCEEDED +exit 0$/m);
    expect(r.stdout).toMatch(/^h02 {2}SUCCEEDED +exit 0$/m);
    expect(r.stdout).toMatch(/^h03 {2}FAILED +exit 7$/m);
    expect(r.stdout).toMatch(/^2 of 3 hosts succeeded \(job j\w+\)$/m);
    // The summary comes after all output.
    const lines = r.stdout.trimEnd().split("\n");
    expect(lines.slice(-4).map((l) => l.split(/\s+/)[0])).toEqual(["h01", "h02", "h03", "2"]);
  });

  it("exits 0 when every chosen host succeeds (--hosts)", async () => {
    setupDone();
    const r = await client(["--hosts", "h01,h02", "--", "echo", "ok"]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(outputOf(r.stdout, "h01")).toEqual(["ok"]);
    expect(outputOf(r.stdout, "h02")).toEqual(["ok"]);
    expect(r.stdout).not.toMatch(/^h03/m);
    expect(r.stdout).toMatch(/^h01 {2}SUCCEEDED +exit 0$/m);
    expect(r.stdout).toMatch(/^h02 {2}SUCCEEDED +exit 0$/m);
    expect(r.stdout).toMatch(/^2 of 2 hosts succeeded /m);
  });

  it("reports a timeout with its signal and no exit code", async () => {
    setupDone();
    const r = await client(["--hosts", "h02", "--timeout", "0.3", "--", "sleep", "10"]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^h02 {2}TIMED_OUT +signal SIG\w+ +\(.+\)$/m);
    expect(r.stdout).toMatch(/^0 of 1 hosts succeeded /m);
  });

  it("reports API errors with their gRPC code", async () => {
    setupDone();
    const r = await client(["--hosts", "nope", "--", "true"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/NOT_FOUND: .*nope/);
  });

  it("submits many jobs in one call (--batch, SubmitJobs): each job's id or why it was refused", async () => {
    setupDone();
    const file = join(genDir, "..", "jobs.jsonl");
    writeFileSync(file, [JSON.stringify({ hostIds: ["h01"], steps: [{ exec: { argv: ["true"] } }] }), JSON.stringify({ hostIds: ["h02"], steps: [] }), JSON.stringify({ allHosts: true, steps: [{ exec: { argv: ["true"] } }] })].join("\n") + "\n");
    const r = await client(["--batch", file]);
    expect(r.code, r.stdout + r.stderr).toBe(1);
    expect(r.stdout).toMatch(/^1: j\w+\n2: refused, INVALID_ARGUMENT: .*at least one step.*\n3: j\w+\n$/);
    expect(r.stderr).toContain("2 of 3 jobs submitted");
  });

  it("needs the controller and credentials (exit 2, usage)", async () => {
    setupDone();
    const r = await client(["--all", "--", "true"], {});
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--controller or REXMESH_CONTROLLER is required/);
  });
});
