import { describe, expect, it } from "vitest";
import { renewalTime } from "../../daemon/renew.js";

describe("renewalTime", () => {
  const h = 3_600_000;
  it("renews renewBefore ahead of expiry for a long-lived certificate", () => {
    expect(renewalTime(0, 24 * h, 8 * h)).toBe(16 * h);
  });
  it("never renews in the first half of a short lifetime (no renewal storm)", () => {
    expect(renewalTime(0, 10 * h, 8 * h)).toBe(5 * h);
  });
});
