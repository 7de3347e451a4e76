/**
 * Vitest globalSetup: makes the run's CAs and leaf keys (test/test-ca.ts)
 * once, before any test file runs, and hands them to the test workers.
 * The four keys are made at once on the thread pool.
 */
import type { TestProject } from "vitest/node";
import { createCa } from "../certs/ca.js";
import { generateKeyPairAsync } from "../certs/keys.js";
import { ManualClock } from "../common/clock.js";
import type { TestPki } from "./test-ca.js";

/**
 * 2020-01-01 to late 2044: well around every clock the tests set (ManualClock's
 * default of 2026-01-01, 2025 in some tests, real time, ten-year leaves).
 */
const NOT_BEFORE = Date.UTC(2020, 0, 1);
const VALIDITY_DAYS = 25 * 365;

export default async function setup(project: TestProject): Promise<void> {
  const clock = new ManualClock(NOT_BEFORE);
  const [caKeys, otherCaKeys, keys, otherKeys] = await Promise.all([generateKeyPairAsync(3072), generateKeyPairAsync(3072), generateKeyPairAsync(), generateKeyPairAsync()]);
  const pki: TestPki = {
    ca: createCa({ clock, commonName: "rexmesh test CA", validityDays: VALIDITY_DAYS, keys: caKeys }),
    otherCa: createCa({ clock, commonName: "unrelated test CA", validityDays: VALIDITY_DAYS, keys: otherCaKeys }),
    keys,
    otherKeys,
  };
  project.provide("testPki", pki);
}
