import { describe, expect, it } from "vitest";
import type { KeyPair } from "../../certs/ca.js";
import { createCsr } from "../../certs/enrollment.js";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { EnrollmentAuthority, type EnrollInput, type EnrollmentEvent } from "../../controller/enroll.js";
import { MemoryEnrollStore } from "../../controller/enroll-store.js";
import { otherTestKeys, testCa, testKeys } from "../test-ca.js";

/**
 * Issue 12: an enrollment refusal must not tell a token holder of one tenant
 * that a host id belongs to another tenant. The answer for "enrolled in
 * another tenant" is the answer for "enrolled in yours with another key".
 */
describe("enrollment refusals reveal no other tenant", () => {
  const clock = new ManualClock();
  const ca = testCa();
  const keys = testKeys();
  const attackerKeys = otherTestKeys();
  const acme: PeerIdentity = { role: "operator", scope: "acme", id: "admin" };
  const beta: PeerIdentity = { role: "operator", scope: "beta", id: "admin" };
  const request = (hostId: string, token: string, k: KeyPair): EnrollInput => ({ hostId, csrPem: createCsr(hostId, k), token, tenant: "", bootstrapCertificatePem: "", bootstrapSignature: new Uint8Array() });

  it("answers an id of another tenant exactly as an id of one's own tenant enrolled with another key", async () => {
    const events: EnrollmentEvent[] = [];
    const authority = new EnrollmentAuthority({ store: new MemoryEnrollStore(), ca, clock, log: silentLogger, hostCertTtlMs: 3_600_000, audit: (e) => void events.push(e) });
    await authority.enroll(request("web-1", (await authority.createToken(acme, {})).token, keys), undefined);
    await authority.enroll(request("bweb-1", (await authority.createToken(beta, {})).token, keys), undefined);
    const refusal = async (hostId: string) => {
      const token = (await authority.createToken(beta, {})).token;
      return authority.enroll(request(hostId, token, attackerKeys), undefined).then(
        () => "enrolled",
        (err: Error) => `${err.name}: ${err.message.replaceAll(hostId, "<id>")}`,
      );
    };
    const otherTenant = await refusal("web-1");
    const ownTenant = await refusal("bweb-1");
    expect(otherTenant).not.toBe("enrolled");
    expect(otherTenant).toBe(ownTenant);
    const reasons = events.filter((e) => e.decision === "refused").map((e) => e.reason!.replaceAll(e.hostId!, "<id>"));
    expect(new Set(reasons).size).toBe(1);
  });
});
