/**
 * A task starts from the daemon's environment without the daemon's own
 * settings: a join token given as REXMESH_JOIN_TOKEN (as the daemon's help
 * advises, to keep it out of the process list) must not reach every task
 * any operator runs on the host. Its own REXMESH_* (task, host, job) are
 * laid over it by the agent. A real process (`env`) prints what it got.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { systemClock } from "../../common/clock.js";
import { Executor } from "../../daemon/executor.js";
import { StepSchema, TaskSpecSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

describe("a task's environment", () => {
  it("is the daemon's without its REXMESH_* settings, with the task's own laid over it", async () => {
    // Before the first task of this file's executor module reads the daemon's environment (it reads it once).
    process.env.REXMESH_JOIN_TOKEN = "rxj_secret-join-token";
    process.env.REXMESH_GRACE = "4000ms";
    process.env.PLAIN_SETTING = "kept";
    const spec = create(TaskSpecSchema, {
      taskId: "t-env",
      env: { REXMESH_TASK_ID: "t-env", MINE: "mine" },
      steps: [create(StepSchema, { tool: { case: "exec", value: { argv: ["env"] } } })],
    });
    let out = "";
    const outcome = await new Executor({ clock: systemClock }).run(spec, { onOutput: (_s, d) => (out += Buffer.from(d).toString()) });
    expect(outcome.state, outcome.message).toBe(TaskState.SUCCEEDED);
    const vars = new Map(out.trim().split("\n").map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
    expect(vars.get("PLAIN_SETTING")).toBe("kept");
    expect(vars.get("MINE")).toBe("mine");
    expect(vars.get("REXMESH_TASK_ID")).toBe("t-env");
    expect(out).not.toContain("secret-join-token");
    expect([...vars.keys()].filter((k) => k.startsWith("REXMESH_"))).toEqual(["REXMESH_TASK_ID"]);
  });
});
