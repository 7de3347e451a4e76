import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { isTerminal } from "../../common/task-state.js";
import { SubmitJobRequestSchema, type Task } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, faultMesh, hostIds, killRole, spawnsOf, until } from "./support.js";

/**
 * A job's tasks kept as one column at the controller (pages written at
 * submit, a delta per page and turn after: controller/lmdb-task-columns.ts),
 * on real LMDB in real processes: a controller killed with SIGKILL mid-job,
 * while output is streaming in, recovers every task from its store alone to
 * at least the state its watchers were told (they hear of a change only once
 * it is durable), and the job then ends with every byte and no task run
 * twice. 300 hosts: the job's column spans two pages.
 */

const HOSTS = hostIds(300, "c");
/** Hosts whose id ends in an even digit fail at once (exit 3); the others print 60 lines over 9 s. */
const script = [
  'echo "$REXMESH_TASK_ID" >> "$MARK/$REXMESH_TASK_ID"',
  'case "$REXMESH_HOST_ID" in *[02468]) echo fast; exit 3;; esac',
  'i=0; while [ $i -lt 60 ]; do echo "line $i"; i=$((i+1)); sleep 0.15; done',
].join("; ");
const fast = (host: string) => /[02468]$/.test(host);
const slowOutput = Array.from({ length: 60 }, (_, i) => `line ${i}\n`).join("");

describe("task columns: a controller killed mid-job recovers every task from its store", () => {
  const { mesh, marks } = faultMesh("columns", "r1", HOSTS, 100);

  it("to at least what its watch reported, with the proxy frozen so that nothing is told again", async () => {
    let conn = clientOf(mesh);
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, steps: [{ tool: { case: "shell", value: { script } } }], env: { MARK: marks } }));
    const jobId = job!.id;
    // What the watch reported last, per host: durable by then.
    const watched = new Map<string, Task>();
    const outputSeen = new Set<string>();
    const watch = (async () => {
      for await (const batch of conn.client.watchJob({ jobId, noOutput: false })) {
        for (const t of batch.tasks) watched.set(t.hostId, t);
        for (const c of batch.output) outputSeen.add(c.taskId);
      }
    })().catch(() => undefined);
    const fastCount = HOSTS.filter(fast).length;
    await until("every fast task ended and output streaming from the slow ones", async () =>
      [...watched.values()].filter((t) => fast(t.hostId) && isTerminal(t.state)).length === fastCount && outputSeen.size >= 20 ? true : undefined,
    60_000);
    const proxy = mesh.proxies[0]!;
    // The proxy is frozen first: nothing it holds reaches the restarted controller until its state is read.
    proxy.proc.kill("SIGSTOP");
    try {
      await killRole(mesh, mesh.controller);
      await watch;
      conn.close();
      const told = new Map(watched);
      await mesh.restart(mesh.controller);
      conn = clientOf(mesh);
      const { tasks } = await conn.client.getJob({ jobId });
      expect(tasks.length).toBe(HOSTS.length);
      const recovered = new Map(tasks.map((t) => [t.hostId, t]));
      let ended = 0;
      for (const [host, was] of told) {
        const now = recovered.get(host)!;
        expect(now.id, host).toBe(was.id);
        if (isTerminal(was.state)) {
          ended++;
          expect([TaskState[now.state], now.exitCode], host).toEqual([TaskState[was.state], was.exitCode]);
        } else {
          expect(now.state, `${host}: ${TaskState[was.state]} was reported, ${TaskState[now.state]} recovered`).toBeGreaterThanOrEqual(was.state);
        }
        expect(now.outputChunks, `${host}'s output`).toBeGreaterThanOrEqual(was.outputChunks);
      }
      expect(ended).toBeGreaterThanOrEqual(fastCount);
      // Mid-job: some tasks were still running, their output coming in.
      expect(ended).toBeLessThan(HOSTS.length);
    } finally {
      proxy.proc.kill("SIGCONT");
    }
    try {
      const r = await collectJob(conn.client, jobId, AbortSignal.timeout(90_000));
      expect(r.tasks.size).toBe(HOSTS.length);
      for (const [host, task] of r.tasks) {
        expect(spawnsOf(marks, task.id), `${host} ran at most once`).toBe(1);
        if (fast(host)) {
          expect([TaskState[task.state], task.exitCode], host).toEqual([TaskState[TaskState.FAILED], 3]);
          expect(r.stdout.get(host)?.toString(), host).toBe("fast\n");
        } else {
          expect(TaskState[task.state], `${host}: ${task.message}`).toBe(TaskState[TaskState.SUCCEEDED]);
          expect(r.stdout.get(host)?.toString(), host).toBe(slowOutput);
        }
      }
    } finally {
      conn.close();
    }
  }, 180_000);
});

