/**
 * Service tier: the public ControllerService as a client sees it, through
 * the real boundary and handlers on an in-memory transport
 * (controller-service.ts), each caller identified by a certificate of the
 * run's test CA. What codes and messages a client gets, and what the
 * controller did (or did not do) behind them.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import type { PeerIdentity } from "../../certs/identity.js";
import { LIMITS } from "../../common/limits.js";
import { JobState, type WatchJobResponse } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { testCa } from "../test-ca.js";
import { controllerService } from "./controller-service.js";
import { chunk, execStep, hostPeer, operator, status, text } from "./support.js";

const alice = operator("acme", "alice"); // admin of acme
const wendy = operator("acme", "wendy"); // web-ops: acme's web hosts only
const bob = operator("beta", "bob"); // admin of beta

/** The error a call ended with (a stream is read to its end), or undefined when it succeeded. */
async function failure(call: Promise<unknown> | AsyncIterable<unknown>): Promise<ConnectError | undefined> {
  try {
    if (Symbol.asyncIterator in call) for await (const _ of call);
    else await call;
    return undefined;
  } catch (err) {
    return ConnectError.from(err);
  }
}

/** Code and message, for comparing refusals as a client sees them. */
const seen = (err: ConnectError | undefined) => err && { code: Code[err.code], message: err.rawMessage };

describe("ControllerService, as a client sees it", () => {
  it("lets an operator with a role list hosts, submit a job, find it, and watch it to its end with its output", async () => {
    const t = await controllerService();
    const client = t.as(alice);
    expect((await client.listHosts({})).hosts.map((h) => h.id).sort()).toEqual(["db-1", "web-1"]);

    const { job } = await client.submitJob({ hostIds: ["web-1"], steps: [execStep("hostname")] });
    expect(job).toMatchObject({ tenant: "acme", submittedBy: "alice", state: JobState.RUNNING, taskCount: 1 });
    const jobId = job!.id;
    expect(t.proxy.tasks.map((s) => [s.jobId, s.hostId, s.steps[0]?.tool.value])).toEqual([[jobId, "web-1", expect.objectContaining({ argv: ["hostname"] })]]);
    expect((await client.listJobs({})).jobs.map((j) => j.id)).toEqual([jobId]);
    const taskId = t.proxy.tasks[0]!.taskId;
    expect((await client.getJob({ jobId })).tasks.map((x) => [x.id, x.hostId])).toEqual([[taskId, "web-1"]]);

    // The watch's first message is the job as it stands, before the host reports; the watch ends by itself once the job is done.
    const watch = client.watchJob({ jobId }, { signal: AbortSignal.timeout(10_000) })[Symbol.asyncIterator]();
    const batches = [(await watch.next()).value as WatchJobResponse];
    await t.jobs.applyStatus(t.proxy, status(taskId, TaskState.RUNNING, { hostId: "web-1" }));
    await t.jobs.applyOutput(t.proxy, chunk(taskId, 1, "web-1.example\n"));
    await t.jobs.applyStatus(t.proxy, status(taskId, TaskState.SUCCEEDED, { hostId: "web-1", exitCode: 0, outputChunks: 1n }));
    for (let next = await watch.next(); !next.done; next = await watch.next()) batches.push(next.value);
    const jobs = batches.flatMap((b) => (b.job ? [b.job] : []));
    const tasks = batches.flatMap((b) => b.tasks);
    const output = batches.flatMap((b) => b.output.map((c) => `${c.hostId}: ${text(c.data)}`)).join("");
    expect(jobs.map((j) => j.state)).toEqual([JobState.RUNNING, JobState.DONE]);
    // The job's counts per state, as they stood at the first batch and at the end.
    expect(jobs.map((j) => [j.taskCount, j.counts.map((c) => `${TaskState[c.state]}:${c.count}`)])).toEqual([[1, ["PENDING:1"]], [1, ["SUCCEEDED:1"]]]);
    expect(tasks.at(-1)).toMatchObject({ id: taskId, state: TaskState.SUCCEEDED, exitCode: 0 });
    expect(output).toBe("web-1: web-1.example\n");

    expect(t.reached).toEqual(["listHosts", "submitJob", "listJobs", "getJob", "watchJob"]);
    expect(t.audit.list("acme").map((e) => `${e.kind} ${e.actor} ${e.decision}`)).toContain("submit operator:acme/alice allowed");
  });

  it("streams a watch's tasks alike in binary (tasks sent in their wire form) and in JSON (the console's, as fields)", async () => {
    const t = await controllerService();
    const { job } = await t.as(alice).submitJob({ hostIds: ["web-1", "db-1"], steps: [execStep("hostname")] });
    const jobId = job!.id;
    const watches = [t.as(alice), t.as(alice, { json: true })].map((c) => c.watchJob({ jobId }, { signal: AbortSignal.timeout(10_000) })[Symbol.asyncIterator]());
    const batches: WatchJobResponse[][] = await Promise.all(watches.map(async (w) => [(await w.next()).value as WatchJobResponse]));
    for (const [i, spec] of t.proxy.tasks.entries()) {
      await t.jobs.applyStatus(t.proxy, status(spec.taskId, TaskState.RUNNING, { hostId: spec.hostId }));
      await t.jobs.applyOutput(t.proxy, chunk(spec.taskId, 1, `${spec.hostId} ✓\n`));
      await t.jobs.applyStatus(t.proxy, status(spec.taskId, TaskState.FAILED, { hostId: spec.hostId, exitCode: i + 1, outputChunks: 1n, message: "ünïcode" }));
    }
    await Promise.all(watches.map(async (w, i) => {
      for (let next = await w.next(); !next.done; next = await w.next()) batches[i]!.push(next.value);
    }));
    const [binary, json] = batches.map((bs) => ({
      tasks: bs.flatMap((b) => b.tasks.map((x) => ({ id: x.id, hostId: x.hostId, state: x.state, exitCode: x.exitCode, message: x.message, chunks: x.outputChunks, complete: x.outputComplete, at: x.updatedAt?.seconds }))),
      output: bs.flatMap((b) => b.output.map((c) => `${c.hostId}: ${text(c.data)}`)).sort(),
    }));
    expect(binary!.tasks.filter((x) => x.state === TaskState.FAILED).map((x) => [x.hostId, x.exitCode, x.message, x.complete]).sort()).toEqual([
      ["db-1", expect.any(Number), "ünïcode", true],
      ["web-1", expect.any(Number), "ünïcode", true],
    ]);
    expect(json).toEqual(binary);
    expect(binary!.output).toEqual(["db-1: db-1 ✓\n", "web-1: web-1 ✓\n"]);
  });

  it("holds an operator to the hosts its role covers: outside them a submit is PERMISSION_DENIED and nothing is sent", async () => {
    const t = await controllerService();
    const client = t.as(wendy);
    expect((await client.listHosts({})).hosts.map((h) => h.id)).toEqual(["web-1"]);
    const refused = await failure(client.submitJob({ hostIds: ["db-1"], steps: [execStep("hostname")] }));
    expect(seen(refused)).toEqual({ code: "PermissionDenied", message: "operator acme/wendy may not run on 1 host outside role web-ops (hosts: role = web): db-1" });
    expect(t.proxy.tasks).toEqual([]);
    await client.submitJob({ hostIds: ["web-1"], steps: [execStep("hostname")] });
    expect(t.proxy.tasks.map((s) => s.hostId)).toEqual(["web-1"]);
  });

  it("refuses a caller without a role, a host's or a proxy's certificate, a revoked identity and a certificate naming no identity, at the boundary", async () => {
    const t = await controllerService();
    const { job } = await t.as(alice).submitJob({ hostIds: ["web-1"], steps: [execStep("hostname")] });
    const jobId = job!.id;
    t.reached.length = 0;
    t.revoked.add("operator:acme/mallory");
    const callers: [string, ReturnType<typeof t.as>, Code, RegExp][] = [
      ["no role", t.as(operator("acme", "nobody")), Code.PermissionDenied, /^operator acme\/nobody has no role in the authorization policy$/],
      ["host", t.as(hostPeer("web-1")), Code.PermissionDenied, /^a host certificate cannot be used here; this service accepts operator certificates$/],
      ["proxy", t.as({ role: "proxy", scope: "eu", id: "px1" } satisfies PeerIdentity), Code.PermissionDenied, /^a proxy certificate cannot be used here/],
      ["revoked (an admin)", t.as(operator("acme", "mallory")), Code.PermissionDenied, /^this certificate's identity has been revoked$/],
      // The CA's own certificate: well formed, issued by the mesh CA, and naming no rexmesh identity.
      ["no identity", t.clientWith(testCa().certPem), Code.Unauthenticated, /^the client certificate names no rexmesh identity$/],
    ];
    for (const [who, client, code, message] of callers) {
      const calls = {
        listHosts: () => client.listHosts({}),
        submitJob: () => client.submitJob({ hostIds: ["web-1"], steps: [execStep("hostname")] }),
        getJob: () => client.getJob({ jobId }),
        watchJob: () => client.watchJob({ jobId }),
        cancelJob: () => client.cancelJob({ jobId }),
        listJobs: () => client.listJobs({}),
      };
      for (const [method, call] of Object.entries(calls)) {
        const err = await failure(call());
        expect(err?.code, `${who}: ${method}`).toBe(code);
        expect(err?.rawMessage, `${who}: ${method}`).toMatch(message);
      }
    }
    expect(t.reached).toEqual([]);
    expect(t.proxy.tasks.map((s) => s.jobId)).toEqual([jobId]);
    expect(t.proxy.cancels).toEqual([]);
    // Each refusal of an identified caller is audited, in the tenant of the identity.
    const denied = t.audit.list("acme", { limit: 1000 }).filter((e) => e.decision === "denied");
    expect(new Set(denied.map((e) => e.actor))).toEqual(new Set(["operator:acme/nobody", "host:acme/web-1", "operator:acme/mallory"]));
  });

  it("refuses a revoked identity only while it is revoked", async () => {
    const t = await controllerService();
    const client = t.as(alice);
    t.revoked.add("operator:acme/alice");
    expect((await failure(client.listHosts({})))?.code).toBe(Code.PermissionDenied);
    t.revoked.clear();
    expect((await client.listHosts({})).hosts).toHaveLength(2);
  });

  it("answers a request it cannot run with INVALID_ARGUMENT naming the problem, and stores and sends nothing", async () => {
    const t = await controllerService();
    const client = t.as(alice);
    const web = { hostIds: ["web-1"], steps: [execStep("hostname")] };
    const cases: [() => Promise<unknown>, string | RegExp][] = [
      [() => client.submitJob({ ...web, steps: [] }), "a job needs at least one step"],
      [() => client.submitJob({ ...web, steps: [execStep()] }), "step 1: exec needs a program to run (argv is empty)"],
      [() => client.submitJob({ steps: web.steps }), "say where to run: host ids, all hosts, or a target query (exactly one of the three)"],
      [() => client.submitJob({ ...web, target: "role=web" }), "say where to run: host ids, all hosts, or a target query (exactly one of the three)"],
      [() => client.submitJob({ steps: web.steps, target: "role=(" }), /^target at \d+: /],
      [() => client.submitJob({ ...web, env: { "1BAD": "x" } }), 'environment variable name "1BAD" is not valid'],
      [() => client.submitJob({ ...web, hostIds: ["h".repeat(LIMITS.idChars + 1)] }), `a host id is longer than ${LIMITS.idChars} characters (${LIMITS.idChars + 1})`],
      [() => client.listHosts({ target: "x".repeat(LIMITS.queryChars + 1) }), `target is longer than ${LIMITS.queryChars} characters (${LIMITS.queryChars + 1})`],
    ];
    for (const [call, message] of cases) {
      const err = await failure(call());
      expect(err?.code, String(message)).toBe(Code.InvalidArgument);
      if (typeof message === "string") expect(err?.rawMessage).toBe(message);
      else expect(err?.rawMessage).toMatch(message);
    }
    expect((await client.listJobs({})).jobs).toEqual([]);
    expect(t.proxy.tasks).toEqual([]);
  });

  it("answers NOT_FOUND for a job that does not exist, and alike for a job the caller may not see", async () => {
    const t = await controllerService();
    const client = t.as(alice);
    const notFound = async (call: Promise<unknown> | AsyncIterable<unknown>) => seen(await failure(call));
    for (const call of [() => client.getJob({ jobId: "j-nope" }), () => client.watchJob({ jobId: "j-nope" }), () => client.cancelJob({ jobId: "j-nope" })]) {
      expect(await notFound(call())).toEqual({ code: "NotFound", message: 'job "j-nope" not found' });
    }
    expect(await notFound(client.submitJob({ hostIds: ["web-1", "nope"], steps: [execStep("hostname")] }))).toEqual({ code: "NotFound", message: "unknown host: nope" });
    // Another tenant's job, and a job only on hosts the caller's role does not cover: as if it did not exist.
    const onDb = (await client.submitJob({ hostIds: ["db-1"], steps: [execStep("hostname")] })).job!.id;
    expect(await notFound(t.as(bob).getJob({ jobId: onDb }))).toEqual({ code: "NotFound", message: `job "${onDb}" not found` });
    expect(await notFound(t.as(wendy).watchJob({ jobId: onDb }))).toEqual({ code: "NotFound", message: `job "${onDb}" not found` });
    expect((await t.as(wendy).listJobs({})).jobs).toEqual([]);
  });
});
