/**
 * The delivery guarantees of docs/delivery.md, each against the fault that
 * broke it, with output in flight while the fault strikes: a proxy restart,
 * a host failing over to the other proxy of its region, a host that
 * vanishes, a revoked host.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { LocalMesh, REXMESH_BIN, type RoleProcess } from "../../cli/launcher.js";
import { isTerminal } from "../../common/task-state.js";
import { ConnectionState, ResultCheck, SubmitJobRequestSchema, type ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, isAlive, killRole, rexmesh, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

type Api = Client<typeof ControllerService>;

/** Prints `line1`..`lineN` with a pause between them, recording its pid first: output in flight for N × pause. */
function printer(markDir: string, lines: number, pause: string) {
  const script = `echo $$ > "$MARK/$REXMESH_TASK_ID.pid"; for i in $(seq 1 ${lines}); do echo "line$i"; sleep ${pause}; done`;
  return { steps: [{ tool: { case: "shell" as const, value: { script } } }], env: { MARK: markDir } };
}

const expected = (lines: number) => Array.from({ length: lines }, (_, i) => `line${i + 1}\n`).join("");

/** Resolves once the task of a job has stored at least `chunks` output chunks. */
const outputStarted = (api: Api, jobId: string, chunks = 1) =>
  until("output to start", async () => {
    const { tasks } = await api.getJob({ jobId });
    return tasks[0] && tasks[0].outputChunks >= BigInt(chunks) ? tasks[0] : undefined;
  });

const terminal = (api: Api, jobId: string, timeoutMs = 30_000) =>
  until(
    "the task to end",
    async () => {
      const { tasks } = await api.getJob({ jobId });
      return tasks[0] && isTerminal(tasks[0].state) ? tasks[0] : undefined;
    },
    timeoutMs,
  );


describe("delivery under faults", () => {
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("delivery"),
    regions: ["r"],
    hosts: [
      { id: "h1", region: "r" },
      { id: "h2", region: "r" },
      { id: "h3", region: "r" },
    ],
    // 10 s of grace (a local mesh gives 4 s): the SIGTERM cases below let a 1.5 s task finish.
    daemonArgs: ["--heartbeat", "1s", "--grace", "10s"],
    proxyArgs: ["--heartbeat", "1s", "--grace", "10s"],
    controllerArgs: ["--heartbeat", "1s"],
  });
  const marks = join(mesh.dir, "marks");
  let second: RoleProcess & { address?: string };
  let mover: ChildProcess | undefined;
  let conn: ReturnType<typeof clientOf>;
  const daemonOf = (host: string) => mesh.daemons.find((d) => d.hosts.includes(host))!;

  /** A host that knows both proxies of the region, first proxy-r, then proxy-r-2. */
  let moverCreds: { cert: string; key: string; ca: string };
  const startMover = () => {
    const h = moverCreds;
    mover = spawn(
      process.execPath,
      [REXMESH_BIN, "daemon", "--proxies", `${mesh.proxies[0]!.address},${second.address}`, "--cert", h.cert, "--key", h.key, "--ca", h.ca, "--data", join(mesh.dir, "data", "mover"), "--heartbeat", "1s"],
      { stdio: ["ignore", "ignore", "ignore"] },
    );
  };
  const where = async (host: string) => (await conn.client.listHosts({})).hosts.find((x) => x.id === host);

  beforeAll(async () => {
    await mesh.start();
    mkdirSync(marks, { recursive: true });
    second = await mesh.startExtraProxy("r", "proxy-r-2");
    moverCreds = mesh.issue({ role: "host", scope: "default", id: "mover" }, join(mesh.dir, "mover"));
    startMover();
    await mesh.waitForHosts(4);
    conn = clientOf(mesh);
  }, 120_000);
  afterAll(async () => {
    conn?.close();
    mover?.kill("SIGTERM");
    await mesh.stop();
  });

  for (const signal of ["SIGKILL", "SIGTERM"] as const) {
    it(`a proxy ${signal}ed and restarted while a task prints loses none of its output, and the task ends only with all of it`, async () => {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h1"], ...printer(marks, 40, "0.05") }));
      await outputStarted(conn.client, job!.id, 3);
      await killRole(mesh, mesh.proxies[0]!, signal);
      await mesh.restart(mesh.proxies[0]!);
      const r = await collectJob(conn.client, job!.id, AbortSignal.timeout(45_000));
      const t = r.tasks.get("h1")!;
      expect(t.state, t.message).toBe(TaskState.SUCCEEDED);
      expect(r.stdout.get("h1")?.toString()).toBe(expected(40));
      expect(t.outputComplete).toBe(true);
      expect(r.seqs.get("h1")).toEqual(Array.from({ length: r.seqs.get("h1")!.length }, (_, i) => i + 1));
    });
  }

  // A SIGTERM drains: the role takes no new work but keeps its streams open until what runs has ended and its
  // results are acknowledged (within its grace, 10 s here), so the task ends while the role is already down.
  for (const role of ["daemon", "proxy"] as const) {
    it(`a ${role} SIGTERMed while a task prints lets it end first: SUCCEEDED with all its output while the ${role} is still down`, async () => {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h1"], ...printer(marks, 30, "0.05") }));
      await outputStarted(conn.client, job!.id, 3);
      const p = role === "daemon" ? daemonOf("h1") : mesh.proxies[0]!;
      const t0 = Date.now();
      await killRole(mesh, p, "SIGTERM");
      // It left on its own once the task was done (exit 0, well inside its 10 s grace), not by a forced exit.
      expect(p.proc.exitCode).toBe(0);
      expect(Date.now() - t0).toBeLessThan(8000);
      try {
        const t = await terminal(conn.client, job!.id, 5000);
        expect(t.state, t.message).toBe(TaskState.SUCCEEDED);
        expect(t.outputComplete).toBe(true);
        const r = await collectJob(conn.client, job!.id, AbortSignal.timeout(10_000));
        expect(r.stdout.get("h1")?.toString()).toBe(expected(30));
      } finally {
        await mesh.restart(p);
      }
    });
  }

  it("an idempotent task whose daemon is SIGKILLed while it prints runs again: all of the second run's output follows the first run's, none taken for a duplicate", async () => {
    // Each run tags its lines with its shell's pid, so the two runs' output cannot be mistaken for each other.
    const script = `for i in $(seq 1 30); do echo "$$ line$i"; sleep 0.05; done`;
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h1"], idempotent: true, steps: [{ tool: { case: "shell", value: { script } } }] }));
    await outputStarted(conn.client, job!.id, 3);
    await killRole(mesh, daemonOf("h1"), "SIGKILL");
    await mesh.restart(daemonOf("h1"));
    const r = await collectJob(conn.client, job!.id, AbortSignal.timeout(45_000));
    const t = r.tasks.get("h1")!;
    expect(t.state, t.message).toBe(TaskState.SUCCEEDED);
    expect(t.outputComplete).toBe(true);
    const seqs = r.seqs.get("h1")!;
    expect(seqs).toEqual(Array.from({ length: seqs.length }, (_, i) => i + 1));
    expect(t.outputChunks).toBe(BigInt(seqs.length));
    // The host's signature holds over its end, chunk count included; it cannot sign output it cannot know (the first
    // run's), so the controller says the state is the host's and the output unchecked — never VERIFIED.
    expect(t.resultCheck).toBe(ResultCheck.STATE_ONLY);
    // The first run's lines (a prefix of its output, as far as it got), then all of the second run's.
    const lines = r.stdout.get("h1")!.toString().trimEnd().split("\n");
    const second = lines.slice(-30);
    const pid = second[0]!.split(" ")[0]!;
    expect(second).toEqual(Array.from({ length: 30 }, (_, i) => `${pid} line${i + 1}`));
    const first = lines.slice(0, -30);
    expect(first.length).toBeGreaterThanOrEqual(3);
    const firstPid = first[0]!.split(" ")[0]!;
    expect(firstPid).not.toBe(pid);
    expect(first).toEqual(Array.from({ length: first.length }, (_, i) => `${firstPid} line${i + 1}`));
    // The end says where the second run's output starts: the chunks before it hold the first run's lines, the
    // chunks from it on the second run's (a loaded daemon may put several lines in one chunk).
    const startsAt = Number(/this run's output starts at chunk (\d+)/.exec(t.message)?.[1]);
    const chunks = r.chunks.get("h1")!;
    const text = (cs: typeof chunks) => Buffer.concat(cs.map((c) => c.data)).toString().trimEnd().split("\n");
    expect(text(chunks.filter((c) => c.seq < startsAt))).toEqual(first);
    expect(text(chunks.filter((c) => c.seq >= startsAt))).toEqual(second);
  });

  it("a host failing over to the other proxy of its region brings its running task: it ends, with all its output once the first proxy returns", async () => {
    const at = await until("mover connected", async () => {
      const h = await where("mover");
      return h?.connection === ConnectionState.CONNECTED ? h.proxy : undefined;
    });
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["mover"], ...printer(marks, 60, "0.05") }));
    await outputStarted(conn.client, job!.id, 3);
    const first = mesh.proxies.find((p) => p.name === at)!;
    await killRole(mesh, first, "SIGKILL");
    // With the first proxy still down, the task ends through the other one (it did not stay RUNNING).
    const t = await terminal(conn.client, job!.id, 40_000);
    expect(t.state, t.message).toBe(TaskState.SUCCEEDED);
    expect(t.proxy).not.toBe(at);
    // Chunks the first proxy had acknowledged but not yet passed on come home with it.
    await mesh.restart(first);
    await until("the output to be complete", async () => ((await conn.client.getJob({ jobId: job!.id })).tasks[0]?.outputComplete ? true : undefined), 30_000);
    const r = await collectJob(conn.client, job!.id, AbortSignal.timeout(30_000));
    expect(r.stdout.get("mover")?.toString()).toBe(expected(60));
  });

  it("a task cancelled after its host failed over is cancelled on the host: CANCELLED, its process gone", async () => {
    await until("mover to reconnect", async () => ((await where("mover"))?.connection === ConnectionState.CONNECTED ? true : undefined));
    const at = (await where("mover"))!.proxy;
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["mover"], ...printer(marks, 600, "0.05") }));
    const running = await outputStarted(conn.client, job!.id, 2);
    const holder = mesh.proxies.find((p) => p.name === at)!;
    await killRole(mesh, holder, "SIGKILL");
    await until("mover on the other proxy", async () => {
      const h = await where("mover");
      return h?.connection === ConnectionState.CONNECTED && h.proxy !== at ? true : undefined;
    });
    await conn.client.cancelJob({ jobId: job!.id });
    const t = await terminal(conn.client, job!.id, 20_000);
    expect(t.state).toBe(TaskState.CANCELLED);
    const pid = Number(readFileSync(join(marks, `${running.id}.pid`), "utf8"));
    await until("the process to be gone", async () => (isAlive(pid) ? undefined : true), 10_000);
    await mesh.restart(holder);
  });

  it("a host that vanishes with its task running: LOST within lost_after; after it returns, the leftover process is ended and its report kept", async () => {
    // A child that never writes (so no SIGPIPE ends it when the daemon's pipes close) and a loop that prints.
    const script = `sleep 300 & echo $! > "$MARK/$REXMESH_TASK_ID.pid"; while true; do echo tick; sleep 0.05; done`;
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h2"], lostAfter: durationFromMs(3000), env: { MARK: marks }, steps: [{ tool: { case: "shell", value: { script } } }] }));
    const running = await outputStarted(conn.client, job!.id, 2);
    const pid = Number(readFileSync(join(marks, `${running.id}.pid`), "utf8"));
    await killRole(mesh, daemonOf("h2"), "SIGKILL");
    // The daemon is gone; its task's process group lives on, re-parented to init.
    expect(isAlive(pid)).toBe(true);
    const t = await terminal(conn.client, job!.id, 20_000);
    expect(t.state).toBe(TaskState.LOST);
    expect(t.message).toMatch(/unreachable since/);
    // A cancel of a job whose host is unreachable ends it at once.
    const { job: other } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h2"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }));
    await conn.client.cancelJob({ jobId: other!.id });
    const c = (await conn.client.getJob({ jobId: other!.id })).tasks[0]!;
    expect(c.state).toBe(TaskState.CANCELLED);
    // The daemon returns: it ends what the interrupted task left running and reports it; the
    // controller keeps LOST and records the report beside it.
    await mesh.restart(daemonOf("h2"));
    await until("the leftover process to be ended", async () => (isAlive(pid) ? undefined : true), 20_000);
    const late = await until("the late report", async () => (await conn.client.getJob({ jobId: job!.id })).tasks[0]?.lateReport, 20_000);
    expect(late.state).toBe(TaskState.INTERRUPTED);
    expect(late.message).toMatch(/leftover process/);
    expect((await conn.client.getJob({ jobId: job!.id })).tasks[0]!.state).toBe(TaskState.LOST);
    // The cancelled task never ran.
    expect(existsSync(join(marks, `${c.id}.pid`))).toBe(false);
  });

  it("a revoked host is refused at submit with the reason, left out of --all, and shown as revoked", async () => {
    const r = await rexmesh(["hosts", "revoke", "h3", "--reason", "disk stolen"], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h3"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }));
    const t = await terminal(conn.client, job!.id, 5000);
    expect(t.state).toBe(TaskState.REJECTED);
    expect(t.message).toMatch(/h3 is revoked: disk stolen/);
    const all = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, dryRun: true, steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }));
    expect(all.plan.map((p) => p.hostId)).not.toContain("h3");
    const h3 = await where("h3");
    expect(h3?.connection).toBe(ConnectionState.REVOKED);
    expect(h3?.revokedReason).toBe("disk stolen");
    const listed = await rexmesh(["hosts"], mesh.exports());
    expect(listed.stdout).toMatch(/h3\s+r\s+\S+\s+revoked/);
  });
});
