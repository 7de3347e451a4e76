import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // The run's test CAs and leaf keys, made once (test/test-ca.ts).
    globalSetup: ["test/test-ca-setup.ts"],
    // Which worker ran which file, when REXMESH_TEST_TRACE is set (.ci/run sets it).
    setupFiles: ["test/worker-trace.ts"],
    // Integration tests start real process meshes; give them room on 2 cores.
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: "forks",
    poolOptions: { forks: { maxForks: 2, minForks: 1 } },
  },
});
