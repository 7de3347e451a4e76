import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { ResourceExhaustedError, UnauthenticatedError } from "../../common/errors.js";
import { ConsoleSessions } from "../../controller/console-sessions.js";

const mallory = { role: "operator", scope: "acme", id: "mallory" } as const;
const bob = { role: "operator", scope: "beta", id: "bob" } as const;

// Found by an attack review: the stores' bounds were shared by every operator of every tenant.
describe("console sessions: one operator cannot use up everyone's links or sessions", () => {
  it("an operator minting links without opening them is refused past its own 5; another tenant's operator is not", () => {
    const clock = new ManualClock(0);
    const s = new ConsoleSessions(clock);
    for (let i = 0; i < 5; i++) s.createLink(mallory);
    expect(() => s.createLink(mallory)).toThrow(ResourceExhaustedError);
    expect(() => s.redeem(s.createLink(bob).secret)).not.toThrow();
    // Once its links expire, it may have new ones.
    clock.advance(2 * 60_000);
    expect(() => s.createLink(mallory)).not.toThrow();
  });

  it("an operator opening link after link keeps 20 sessions at most (its oldest end), and others still log in", () => {
    const clock = new ManualClock(0);
    const s = new ConsoleSessions(clock);
    const opened = Array.from({ length: 10_000 }, () => s.redeem(s.createLink(mallory).secret).secret);
    expect(opened.filter((x) => s.session(x) !== undefined)).toEqual(opened.slice(-20));
    const link = s.createLink(bob);
    expect(() => s.redeem(link.secret)).not.toThrow();
  });

  it("a session never outlives the certificate its link was asked with", () => {
    const clock = new ManualClock(0);
    const s = new ConsoleSessions(clock);
    const { secret, session } = s.redeem(s.createLink(mallory, 10 * 60_000).secret);
    expect(session.expiresAt).toBe(10 * 60_000);
    clock.advance(10 * 60_000);
    expect(s.session(secret)).toBeUndefined();
    // A link asked with a certificate about to expire lasts no longer than it; one asked after, never opens.
    const soon = s.createLink(mallory, clock.now() + 1000);
    expect(soon.expiresAt).toBe(clock.now() + 1000);
    clock.advance(1000);
    expect(() => s.redeem(soon.secret)).toThrow(UnauthenticatedError);
    expect(() => s.createLink(mallory, clock.now())).toThrow(UnauthenticatedError);
  });
});
