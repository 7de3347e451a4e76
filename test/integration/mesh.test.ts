import { createHash } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { LocalMesh } from "../../cli/launcher.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, hostIds, isAlive, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * The whole mesh as real processes over mTLS on 127.0.0.1:0: one
 * controller, two proxies in two regions, and 20 daemons, each its own
 * process, identity and stream.
 */
describe("a mesh of real processes", () => {
  const hosts = hostIds(20);
  const regions = ["east", "west"];
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("mesh"),
    regions,
    hosts: hosts.map((id, i) => ({ id, region: regions[i % 2]! })),
    hostsPerProcess: 1,
    daemonArgs: ["--kill-grace", "1s"],
  });
  let conn: ReturnType<typeof clientOf>;

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(hosts.length);
    conn = clientOf(mesh);
  });

  afterAll(async () => {
    conn?.close();
    await mesh.stop();
    // SIGTERM drained every process: none needed the SIGKILL that follows the grace time.
    for (const p of mesh.all()) expect({ name: p.name, code: p.proc.exitCode, signal: p.proc.signalCode }).toEqual({ name: p.name, code: 0, signal: null });
  });

  it("runs 20 daemons as separate processes behind two proxies", async () => {
    expect(new Set(mesh.daemons.map((d) => d.proc.pid)).size).toBe(20);
    const { hosts: listed } = await conn.client.listHosts({});
    expect(listed.map((h) => h.id).sort()).toEqual(hosts);
    for (const h of listed) expect(h.region).toBe(regions[hosts.indexOf(h.id) % 2]);
    expect(new Set(listed.map((h) => h.proxy))).toEqual(new Set(["proxy-east", "proxy-west"]));
  });

  it("runs a command on every host and returns each host's output and exit code", async () => {
    const script = 'echo "out:$REXMESH_HOST_ID"; echo "err:$REXMESH_HOST_ID" >&2; case $REXMESH_HOST_ID in h05) exit 3;; h13) exit 7;; esac';
    const { job } = await conn.client.submitJob(
      create(SubmitJobRequestSchema, { allHosts: true, steps: [{ tool: { case: "shell", value: { script } } }] }),
    );
    const r = await collectJob(conn.client, job!.id);
    expect(r.tasks.size).toBe(20);
    for (const h of hosts) {
      const t = r.tasks.get(h)!;
      const want = h === "h05" ? 3 : h === "h13" ? 7 : 0;
      expect(t.exitCode, h).toBe(want);
      expect(t.state, h).toBe(want === 0 ? TaskState.SUCCEEDED : TaskState.FAILED);
      expect(r.stdout.get(h)?.toString(), h).toBe(`out:${h}\n`);
      expect(r.stderr.get(h)?.toString(), h).toBe(`err:${h}\n`);
      expect(t.region).toBe(regions[hosts.indexOf(h) % 2]);
    }
  });

  it("delivers 10 MiB of binary stdout byte-identical (SHA-256)", async () => {
    // The host hashes what it writes and reports the digest on stderr.
    const script = 'f=$(mktemp); head -c 10485760 /dev/urandom > "$f"; sha256sum "$f" | cut -d" " -f1 >&2; cat "$f"; rm -f "$f"';
    const { job } = await conn.client.submitJob(
      create(SubmitJobRequestSchema, { hostIds: ["h04"], steps: [{ tool: { case: "shell", value: { script } } }] }),
    );
    const r = await collectJob(conn.client, job!.id);
    expect(r.tasks.get("h04")!.state).toBe(TaskState.SUCCEEDED);
    const out = r.stdout.get("h04")!;
    expect(out.length).toBe(10 * 1024 * 1024);
    expect(createHash("sha256").update(out).digest("hex")).toBe(r.stderr.get("h04")!.toString().trim());
    const seqs = r.seqs.get("h04")!;
    expect(seqs).toEqual(seqs.map((_, i) => i + 1));
  });

  it("times out a command and leaves nothing of its process group alive", async () => {
    // A child that ignores SIGTERM and a background grandchild: both must die.
    const script = 'sleep 1000 & echo "bg:$!"; sh -c \'trap "" TERM; echo "trap:$$"; exec sleep 1000\' & wait';
    const { job } = await conn.client.submitJob(
      create(SubmitJobRequestSchema, {
        hostIds: ["h07", "h08"],
        timeout: durationFromMs(1500),
        steps: [{ tool: { case: "shell", value: { script } } }],
      }),
    );
    const r = await collectJob(conn.client, job!.id);
    for (const h of ["h07", "h08"]) {
      const t = r.tasks.get(h)!;
      expect(t.state, h).toBe(TaskState.TIMED_OUT);
      const pids = [...r.stdout.get(h)!.toString().matchAll(/(?:bg|trap):(\d+)/g)].map((m) => Number(m[1]));
      expect(pids.length, h).toBe(2);
      for (const pid of pids) expect(isAlive(pid), `${h} pid ${pid}`).toBe(false);
    }
  });

  it("rexmesh run prints host-prefixed live output and a summary, and exits 1 when a host failed", async () => {
    const r = await rexmesh(["run", "-H", "h01,h02,h03", "--", "sh", "-c", 'echo "hi $REXMESH_HOST_ID"; [ "$REXMESH_HOST_ID" != h02 ]'], mesh.exports());
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^h01 out\| hi h01$/m);
    expect(r.stdout).toMatch(/^h02 out\| hi h02$/m);
    expect(r.stdout).toMatch(/^3 hosts: 2 succeeded, 1 failed/m);
    expect(r.stdout).toMatch(/^ {2}h02 \[west\] FAILED: exit code 1/m);
    const ok = await rexmesh(["run", "--all", "--", "true"], mesh.exports());
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/^20 hosts: 20 succeeded/m);
  });

  it("rexmesh run --json prints one object per event, ending with a summary", async () => {
    const r = await rexmesh(["run", "-H", "h09", "--json", "--", "printf", "a\\001b"], mesh.exports());
    expect(r.code).toBe(0);
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l));
    expect(events[0].type).toBe("job");
    const output = events.filter((e) => e.type === "output");
    expect(Buffer.concat(output.map((e) => Buffer.from(e.data, "base64"))).toString("latin1")).toBe("a\x01b");
    expect(output[0]).toMatchObject({ host: "h09", stream: "stdout", seq: 1 });
    expect(events.filter((e) => e.type === "task").at(-1).task).toMatchObject({ host: "h09", state: "SUCCEEDED", exitCode: 0 });
    expect(events.at(-1)).toMatchObject({ type: "summary", hosts: 1, ok: true, counts: { SUCCEEDED: 1 } });
  });

  it("a failing canary batch leaves every other host SKIPPED, and rexmesh jobs lists the job", async () => {
    const r = await rexmesh(["run", "--all", "--batch", "2", "--json", "--", "false"], mesh.exports());
    expect(r.code).toBe(1);
    const summary = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
    expect(summary.counts).toEqual({ FAILED: 2, SKIPPED: 18 });
    const list = await rexmesh(["jobs", "--json"], mesh.exports());
    expect(JSON.parse(list.stdout)[0]).toMatchObject({ id: summary.job, state: "DONE", tasks: 20, counts: { FAILED: 2, SKIPPED: 18 } });
  });

  it("rexmesh jobs cancel stops running tasks: CANCELLED, their process groups gone", async () => {
    const { job } = await conn.client.submitJob(
      create(SubmitJobRequestSchema, { hostIds: ["h10", "h11"], steps: [{ tool: { case: "shell", value: { script: 'sleep 1000 & echo "bg:$!"; wait' } } }] }),
    );
    // Wait until both have started (each printed its child's pid).
    const pids: number[] = [];
    for await (const batch of conn.client.watchJob({ jobId: job!.id })) {
      for (const c of batch.output) pids.push(...[...Buffer.from(c.data).toString().matchAll(/bg:(\d+)/g)].map((m) => Number(m[1])));
      if (pids.length === 2) break;
    }
    const r = await rexmesh(["jobs", "cancel", job!.id], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const done = await collectJob(conn.client, job!.id);
    for (const h of ["h10", "h11"]) expect(done.tasks.get(h)!.state, h).toBe(TaskState.CANCELLED);
    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
  });

  it("keeps at most --output-limit bytes per host and marks the rest truncated", async () => {
    const r = await rexmesh(["run", "-H", "h12", "--output-limit", "100", "--json", "--", "head", "-c", "5000", "/dev/zero"], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l));
    const bytes = events.filter((e) => e.type === "output").reduce((n, e) => n + Buffer.from(e.data, "base64").length, 0);
    expect(bytes).toBe(100);
    expect(events.filter((e) => e.type === "task").at(-1).task).toMatchObject({ state: "SUCCEEDED", outputTruncated: true });
  });

  it("rexmesh ping: every host answers without starting a process", async () => {
    const r = await rexmesh(["ping", "--all", "--json"], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split("\n").map((l) => JSON.parse(l));
    expect(lines.at(-1)).toMatchObject({ type: "summary", hosts: 20, replied: 20 });
    expect(lines.filter((l) => l.type === "host" && l.ok).map((l) => l.host).sort()).toEqual(hosts);
  });

  it("reports an unknown host as NOT_FOUND and runs nothing", async () => {
    await expect(
      conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h01", "nope"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] })),
    ).rejects.toMatchObject({ code: 5, rawMessage: "unknown host: nope" });
  });
});
