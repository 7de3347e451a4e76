/**
 * The web console's login links and sessions (controller/console-sessions.ts)
 * on a manual clock: a link works once and only within its time; a session
 * ends at its time or on logout; secrets are kept hashed; the stores are
 * bounded. And what RerunJob refuses to rebuild (controller/rerun.ts).
 */
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { ResourceExhaustedError, UnauthenticatedError, FailedPreconditionError } from "../../common/errors.js";
import { ConsoleSessions } from "../../controller/console-sessions.js";
import { rerunRequest } from "../../controller/rerun.js";
import type { JobRecord } from "../../controller/model.js";

const alice = { role: "operator", scope: "acme", id: "alice" } as const;

describe("console links and sessions", () => {
  it("a link works once, before it expires, and gives a session bound to the operator until its own expiry", () => {
    const clock = new ManualClock(1_000_000);
    const s = new ConsoleSessions(clock, { linkTtlMs: 120_000, sessionTtlMs: 8 * 3_600_000 });
    const link = s.createLink(alice);
    expect(link.secret).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(link.expiresAt).toBe(1_120_000);
    const { secret, session } = s.redeem(link.secret);
    expect(session.peer).toEqual(alice);
    expect(s.session(secret)?.peer).toEqual(alice);
    expect(() => s.redeem(link.secret)).toThrow(UnauthenticatedError);
    // A session secret is no link, and a link secret is no session.
    expect(() => s.redeem(secret)).toThrow(UnauthenticatedError);
    expect(s.session(link.secret)).toBeUndefined();
    clock.advance(8 * 3_600_000 - 1);
    expect(s.session(secret)).toBeDefined();
    clock.advance(1);
    expect(s.session(secret)).toBeUndefined();
  });

  it("a link not opened within its time is refused; logout ends a session; malformed secrets are nobody", () => {
    const clock = new ManualClock(0);
    const s = new ConsoleSessions(clock);
    const late = s.createLink(alice);
    clock.advance(2 * 60_000);
    expect(() => s.redeem(late.secret)).toThrow(/not valid/);
    const { secret } = s.redeem(s.createLink(alice).secret);
    s.end(secret);
    expect(s.session(secret)).toBeUndefined();
    for (const forged of ["", "x", "A".repeat(43), "A".repeat(4096), `${secret}x`]) expect(s.session(forged)).toBeUndefined();
  });

  it("bounds what it holds, dropping expired entries first, and ends a revoked operator's sessions", () => {
    const clock = new ManualClock(0);
    const s = new ConsoleSessions(clock, { maxLinks: 2, linkTtlMs: 1000 });
    s.createLink(alice);
    s.createLink(alice);
    expect(() => s.createLink(alice)).toThrow(ResourceExhaustedError);
    clock.advance(1000);
    const fresh = s.createLink(alice);
    const { secret } = s.redeem(fresh.secret);
    s.endAllOf((p) => p.id === "alice");
    expect(s.session(secret)).toBeUndefined();
  });

  it("keeps only hashes: the secrets are nowhere in its state", () => {
    const s = new ConsoleSessions(new ManualClock(0));
    const link = s.createLink(alice);
    const { secret } = s.redeem(s.createLink(alice).secret);
    const state = JSON.stringify([...Object.values(s as unknown as Record<string, unknown>)].map((v) => (v instanceof Map ? [...v.keys()] : v)));
    expect(state).not.toContain(link.secret);
    expect(state).not.toContain(secret);
  });
});

describe("RerunJob's request", () => {
  const job = (more: Partial<JobRecord>): JobRecord =>
    ({ id: "j1", tenant: "acme", submittedBy: "alice", createdAt: 0, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 3_600_000, lostAfterMs: 900_000, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: [], outputLimitBytes: 0, ...more }) as JobRecord;
  it("runs a document again by its exact version and parameters, with the same delivery window", () => {
    const req = rerunRequest(job({ document: "probe@3", parameters: { message: "hi", hosts: '["a","b"]' } }), ["h1"], "");
    expect(req).toMatchObject({ hostIds: ["h1"], document: "probe@3", parameters: { message: "hi", hosts: '["a","b"]' }, steps: [], deliveryDeadlineMs: 3_600_000, lostAfterMs: 900_000 });
  });
  it("refuses what the controller did not keep: a sensitive parameter's value, an inline document", () => {
    expect(() => rerunRequest(job({ document: "deploy@1", parameters: { token: "[sensitive]" } }), ["h1"], "")).toThrow(FailedPreconditionError);
    expect(() => rerunRequest(job({ document: "fix (inline)" }), ["h1"], "")).toThrow(/inline/);
  });
});
