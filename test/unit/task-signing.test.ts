import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { ManualClock } from "../../common/clock.js";
import { TaskRejected, TaskSigner, TaskVerifier } from "../../common/task-signing.js";
import { SignedTaskSchema, StepSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { otherTestCa, otherTestKeys, testCredentials } from "../test-ca.js";
import { taskSpec, testSigning } from "./support.js";

const clock = new ManualClock(Date.UTC(2025, 6, 1));
const spec = taskSpec("t1", "h1", { deliverByMs: clock.now() + 60_000 });

describe("TaskVerifier", () => {
  it("accepts a task signed by an endorsed controller key and returns its spec", () => {
    const { signer, caPem } = testSigning();
    const v = new TaskVerifier(caPem, clock);
    expect(v.addKeys([signer.key])).toBe(1);
    expect(v.verify(signer.sign(spec)).taskId).toBe("t1");
  });

  it("refuses an altered, unsigned or unknown-key task, naming why", () => {
    const { signer, caPem } = testSigning();
    const v = new TaskVerifier(caPem, clock);
    v.addKeys([signer.key]);
    const signed = signer.sign(spec);
    const altered = create(SignedTaskSchema, { ...signed, spec: Uint8Array.from(signed.spec, (b, i) => (i === 5 ? b ^ 1 : b)) });
    expect(() => v.verify(altered)).toThrow(/altered on the way/);
    expect(() => v.verify(create(SignedTaskSchema, { spec: signed.spec, keyId: signed.keyId }))).toThrow(/not signed/);
    expect(() => v.verify(create(SignedTaskSchema, { ...signed, keyId: "nope" }))).toThrow(TaskRejected);
  });

  it("sends a ping-only task unsigned and accepts it unsigned; anything else unsigned is refused", () => {
    const { signer, caPem } = testSigning();
    const v = new TaskVerifier(caPem, clock);
    v.addKeys([signer.key]);
    const ping = taskSpec("t2", "h1", { deliverByMs: clock.now() + 60_000 });
    ping.steps = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    const signedPing = signer.sign(ping);
    expect(signedPing.signature.length).toBe(0);
    expect(v.verify(signedPing).taskId).toBe("t2");
    // A ping with a command smuggled in beside it is not a ping: unsigned, it is refused.
    const mixed = taskSpec("t3", "h1", { deliverByMs: clock.now() + 60_000 });
    mixed.steps = [create(StepSchema, { tool: { case: "ping", value: {} } }), ...spec.steps];
    expect(signer.sign(mixed).signature.length).toBeGreaterThan(0);
    expect(() => v.verify(create(SignedTaskSchema, { spec: signer.sign(mixed).spec }))).toThrow(/not signed/);
  });

  it("trusts no key endorsed by a host certificate, by another CA, or past its expiry", () => {
    const { caPem } = testSigning();
    const longAgo = new ManualClock(Date.UTC(2025, 0, 1));
    const tenYears = 10 * 365 * 86_400_000;
    // A second mesh: its controller and one of its hosts (on a key of their own: not the key of our controller's certificate).
    const otherCa = otherTestCa();
    const theirs = { clock: longAgo, validityMs: tenYears, ca: otherCa, keys: otherTestKeys() };
    const hostCreds = testCredentials({ role: "host", scope: "t", id: "h" }, theirs);
    const otherCtl = testCredentials({ role: "controller", scope: "mesh", id: "c" }, theirs);
    // Against the other CA: a controller key is fine, a host-endorsed key is not.
    const vOther = new TaskVerifier(otherCa.certPem, clock);
    expect(vOther.addKeys([new TaskSigner(hostCreds, longAgo, tenYears).key])).toBe(0);
    expect(vOther.addKeys([new TaskSigner(otherCtl, longAgo, tenYears).key])).toBe(1);
    // Against our CA: the other CA's controller is a stranger.
    const v = new TaskVerifier(caPem, clock);
    expect(v.addKeys([new TaskSigner(otherCtl, longAgo, tenYears).key])).toBe(0);
    // An expired key is not taken.
    const shortLived = new TaskSigner(otherCtl, longAgo, 1000);
    expect(new TaskVerifier(otherCa.certPem, clock).addKeys([shortLived.key])).toBe(0);
  });
});
