/**
 * RerunJob through the real boundary and handlers (controller-service.ts):
 * which hosts it picks, that the new job carries the earlier request, and
 * that it is decided and audited as the caller's submit.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { controllerService } from "./controller-service.js";
import { execStep, operator, status } from "./support.js";

const alice = operator("acme", "alice"); // admin of acme
const wendy = operator("acme", "wendy"); // web-ops: read, submit, cancel on acme's web hosts, command hostname only
const bob = operator("beta", "bob"); // admin of beta

const codeOf = (p: Promise<unknown>) => p.then(() => undefined, (err: unknown) => Code[ConnectError.from(err).code]);

describe("RerunJob", () => {
  it("runs the earlier request again on the hosts in the states asked for, or on the hosts named, and audits it as a submit", async () => {
    const t = await controllerService();
    const client = t.as(alice);
    const { job } = await client.submitJob({ hostIds: ["web-1", "db-1"], steps: [execStep("hostname")], env: { A: "1" }, workingDir: "/tmp", timeout: { seconds: 30n } });
    const [web, db] = ["web-1", "db-1"].map((h) => t.proxy.tasks.find((x) => x.hostId === h)!);
    await t.jobs.applyStatus(t.proxy, status(web!.taskId, TaskState.SUCCEEDED, { hostId: "web-1", exitCode: 0 }));
    await t.jobs.applyStatus(t.proxy, status(db!.taskId, TaskState.FAILED, { hostId: "db-1", exitCode: 2 }));

    const { job: rerun } = await client.rerunJob({ jobId: job!.id, states: [TaskState.FAILED, TaskState.TIMED_OUT] });
    const sent = t.proxy.tasks.filter((x) => x.jobId === rerun!.id);
    expect(sent.map((x) => x.hostId)).toEqual(["db-1"]);
    expect(sent[0]).toMatchObject({ env: { A: "1" }, workingDir: "/tmp", timeout: { seconds: 30n } });
    expect(sent[0]!.steps[0]?.tool.value).toMatchObject({ argv: ["hostname"] });
    expect(t.audit.list("acme").filter((e) => e.jobId === rerun!.id).map((e) => `${e.kind} ${e.decision}`)).toEqual(["submit allowed"]);

    const { job: named } = await client.rerunJob({ jobId: job!.id, hostIds: ["web-1"] });
    expect(t.proxy.tasks.filter((x) => x.jobId === named!.id).map((x) => x.hostId)).toEqual(["web-1"]);
    // A host that is not the job's, both or neither way of picking, and no host in the states: refused, nothing sent.
    const before = t.proxy.tasks.length;
    await expect(codeOf(client.rerunJob({ jobId: job!.id, hostIds: ["web-9"] }))).resolves.toBe("InvalidArgument");
    await expect(codeOf(client.rerunJob({ jobId: job!.id, hostIds: ["web-1"], states: [TaskState.FAILED] }))).resolves.toBe("InvalidArgument");
    await expect(codeOf(client.rerunJob({ jobId: job!.id }))).resolves.toBe("InvalidArgument");
    await expect(codeOf(client.rerunJob({ jobId: job!.id, states: [TaskState.LOST] }))).resolves.toBe("FailedPrecondition");
    expect(t.proxy.tasks.length).toBe(before);
  });

  it("is the caller's submit: another tenant sees no job, a role is held to its hosts", async () => {
    const t = await controllerService();
    const { job } = await t.as(alice).submitJob({ hostIds: ["web-1", "db-1"], steps: [execStep("hostname")] });
    const before = t.proxy.tasks.length;
    await expect(codeOf(t.as(bob).rerunJob({ jobId: job!.id, hostIds: ["web-1"] }))).resolves.toBe("NotFound");
    // wendy reads only web-1's task: db-1 is not a host of the job as she sees it.
    await expect(codeOf(t.as(wendy).rerunJob({ jobId: job!.id, hostIds: ["db-1"] }))).resolves.toBe("InvalidArgument");
    expect(t.proxy.tasks.length).toBe(before);
    await t.as(wendy).rerunJob({ jobId: job!.id, hostIds: ["web-1"] });
    expect(t.proxy.tasks.length).toBe(before + 1);
  });
});
