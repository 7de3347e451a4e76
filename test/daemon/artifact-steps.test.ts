import { mkdtempSync, readFileSync, realpathSync, statSync, symlinkSync, writeFileSync, existsSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock, systemClock } from "../../common/clock.js";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { digestOf } from "../../common/digest.js";
import type { ArtifactFetcher } from "../../daemon/artifact-fetch.js";
import { Executor } from "../../daemon/executor.js";
import { StepSchema, TaskSpecSchema, TaskState, type Step } from "../../gen/rexmesh/v1/task_pb.js";

const temp = (p: string) => realpathSync(mkdtempSync(join(tmpdir(), `rexmesh-steps-${p}-`)));

/** A fetcher over an in-memory repository; `serve` may hand out other bytes than asked for (a corrupting hop). */
function fakeFetcher(repo: Map<string, Buffer>, serve = (_d: string, b: Buffer) => b): { fetch: ArtifactFetcher; paths: string[] } {
  const dir = temp("fetch");
  const paths: string[] = [];
  let n = 0;
  return {
    paths,
    fetch: async (digest) => {
      const b = repo.get(digest);
      if (!b) throw new Error(`artifact ${digest}: not found`);
      const path = join(dir, `f${++n}`);
      writeFileSync(path, serve(digest, b), { mode: 0o600 });
      paths.push(path);
      return path;
    },
  };
}

async function run(executor: Executor, steps: Step[]) {
  let out = "";
  const outcome = await executor.run(create(TaskSpecSchema, { taskId: "t", steps }), { onOutput: (_s, d) => (out += Buffer.from(d).toString()) });
  return { outcome, out };
}

describe("script and file.put steps", () => {
  const script = Buffer.from('echo "args:$*"; echo "self:$0"\n');
  const content = Buffer.from("key = value\n");
  const repo = new Map([
    [digestOf(script), script],
    [digestOf(content), content],
  ]);

  it("runs a fetched script with /bin/sh and its args from a private file, removed afterwards", async () => {
    const f = fakeFetcher(repo);
    const ex = new Executor({ clock: systemClock, fetchArtifact: f.fetch });
    const { outcome, out } = await run(ex, [create(StepSchema, { tool: { case: "script", value: { artifact: digestOf(script), args: ["a b", "c"] } } })]);
    expect(outcome.state, outcome.message).toBe(TaskState.SUCCEEDED);
    expect(out).toContain("args:a b c");
    expect(out).toContain(`self:${f.paths[0]}`);
    expect(existsSync(f.paths[0]!)).toBe(false);
  });

  it("refuses an artifact whose bytes do not match its digest, naming the digest, and runs nothing", async () => {
    const f = fakeFetcher(repo, () => Buffer.from("echo pwned\n"));
    const ex = new Executor({ clock: systemClock, fetchArtifact: f.fetch });
    const { outcome, out } = await run(ex, [create(StepSchema, { tool: { case: "script", value: { artifact: digestOf(script) } } })]);
    expect(outcome.state).toBe(TaskState.FAILED);
    expect(outcome.message).toContain(digestOf(script));
    expect(out).toBe("");
  });

  it("writes a file.put inside base_dir with its mode, and refuses a symlink escape", async () => {
    const f = fakeFetcher(repo);
    const ex = new Executor({ clock: systemClock, fetchArtifact: f.fetch });
    const base = temp("base");
    const outside = temp("outside");
    symlinkSync(outside, join(base, "out"));
    const put = (path: string, mode = 0o600): Step => create(StepSchema, { tool: { case: "filePut", value: { artifact: digestOf(content), path, baseDir: base, mode } } });
    const ok = await run(ex, [put("app.conf")]);
    expect(ok.outcome.state, ok.outcome.message).toBe(TaskState.SUCCEEDED);
    expect(readFileSync(join(base, "app.conf"))).toEqual(content);
    expect(statSync(join(base, "app.conf")).mode & 0o777).toBe(0o600);
    const bad = await run(ex, [put("out/app.conf")]);
    expect(bad.outcome.state).toBe(TaskState.FAILED);
    expect(bad.outcome.message).toMatch(/outside/);
    expect(readdirSync(outside)).toEqual([]);
    const dots = await run(ex, [put("../app.conf")]);
    expect(dots.outcome.state).toBe(TaskState.FAILED);
    expect(dots.outcome.message).toMatch(/\.\./);
  });

  it("a timeout during the fetch ends the task TIMED_OUT and aborts the fetch", async () => {
    const clock = new ManualClock();
    let aborted = false;
    let started!: () => void;
    const fetching = new Promise<void>((r) => (started = r));
    const fetch: ArtifactFetcher = (_digest, signal) =>
      new Promise((_resolve, reject) => {
        started();
        signal?.addEventListener("abort", () => {
          aborted = true;
          reject(new Error("aborted"));
        });
      });
    const ex = new Executor({ clock, fetchArtifact: fetch });
    const step = create(StepSchema, { tool: { case: "script", value: { artifact: digestOf(script) } } });
    const done = ex.run(create(TaskSpecSchema, { taskId: "t", steps: [step], timeout: durationFromMs(1000) }), { onOutput: () => {} });
    await fetching;
    clock.advance(1000);
    const outcome = await done;
    expect(outcome.state).toBe(TaskState.TIMED_OUT);
    expect(aborted).toBe(true);
  });

  it("without an artifact source, script and file.put steps fail saying so", async () => {
    const ex = new Executor({ clock: systemClock });
    const { outcome } = await run(ex, [create(StepSchema, { tool: { case: "script", value: { artifact: digestOf(script) } } })]);
    expect(outcome.state).toBe(TaskState.FAILED);
    expect(outcome.message).toContain("no artifact source");
  });
});
