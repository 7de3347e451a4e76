import { execFile } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { fromBinary } from "@bufbuild/protobuf";
import { checkReleaseArtifact, parseReleaseKeys, verifyRelease } from "../../common/release.js";
import { SignedReleaseSchema } from "../../gen/rexmesh/v1/release_pb.js";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, rexmesh, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

type Ran = Awaited<ReturnType<typeof rexmesh>>;

/**
 * A role run with bad options, killed after `killMs` should it start anyway
 * (it would run until stopped): the exit code is then null.
 */
function role(args: string[], killMs = 20_000): Promise<Ran> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) env[k] = v;
  return new Promise((resolve) => {
    execFile(process.execPath, [REXMESH_BIN, ...args], { env, timeout: killMs, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      const code = err ? (err as { code?: unknown }).code : 0;
      resolve({ code: typeof code === "number" ? code : (null as unknown as number), stdout, stderr });
    });
  });
}

/** A refusal as an operator should see it: one line on stderr naming the problem, nothing on stdout, no stack. */
function expectOneLine(r: Ran, message: RegExp, code = 2): void {
  const shown = `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  expect(r.code, shown).toBe(code);
  expect(r.stdout, shown).toBe("");
  expect(r.stderr, shown).toMatch(/^rexmesh: [^\n]+\n$/);
  expect(r.stderr, shown).toMatch(message);
  expect(r.stderr, shown).not.toMatch(/ {4}at |node:internal|Error: /);
}

/**
 * Issue 18, the CLI's rough edges: each case runs the real CLI against one
 * small mesh (three hosts in one region) and reads its stdout, stderr and
 * exit code.
 */
describe("the CLI's rough edges", () => {
  const work = tempDir("cli-edges");
  const mesh = new LocalMesh({ ca: testCa(), dir: join(work, "mesh"), regions: ["east"], hosts: ["h1", "h2", "h3"].map((id) => ({ id, region: "east" })) });
  const cli = (args: string[]) => rexmesh(args, mesh.exports());
  const missing = join(work, "no-such-file");

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(3);
  });
  afterAll(async () => {
    await mesh.stop();
  });

  describe("errors are one line with exit 2, not a stack trace", () => {
    it("a missing file named on the command line (run --stdin, bundle import, artifacts put)", async () => {
      const [stdin, bundle, artifact] = await Promise.all([cli(["run", "--all", "--stdin", missing, "--", "cat"]), cli(["bundle", "import", missing]), cli(["artifacts", "put", missing])]);
      expectOneLine(stdin, /^rexmesh: --stdin \S+no-such-file: no such file$/m);
      expectOneLine(bundle, /^rexmesh: bundle import \S+no-such-file: no such file$/m);
      expectOneLine(artifact, /^rexmesh: artifacts put \S+no-such-file: no such file$/m);
    });

    it("a role's bad --listen or --log-level, refused before it starts", async () => {
      const ids = join(mesh.dir, "identities");
      const creds = (data: string) => ["--cert", join(ids, "controller.crt"), "--key", join(ids, "controller.key"), "--ca", join(ids, "ca.crt"), "--data", join(work, data)];
      const [listen, metrics, level, daemonLevel] = await Promise.all([
        role(["controller", "--listen", "nonsense", ...creds("c1")]),
        role(["controller", "--listen", "127.0.0.1:0", "--metrics-listen", "somewhere", ...creds("c2")]),
        role(["controller", "--listen", "127.0.0.1:0", "--log-level", "loud", ...creds("c3")]),
        role(["daemon", "--proxies", "127.0.0.1:1", "--log-level", "chatty"]),
      ]);
      expectOneLine(listen, /^rexmesh: --listen "nonsense" is not host:port$/m);
      expectOneLine(metrics, /^rexmesh: --metrics-listen "somewhere" is not host:port$/m);
      expectOneLine(level, /^rexmesh: log level "loud" is not one of debug, info, warn, error$/m);
      expectOneLine(daemonLevel, /log level "chatty" is not one of/);
    });

    it("an option value that starts with '-', a missing value and an unknown option", async () => {
      const [negative, missingValue, unknown, equals] = await Promise.all([
        cli(["run", "--all", "--timeout", "-5s", "--", "true"]),
        cli(["hosts", "-t"]),
        cli(["jobs", "--frobnicate"]),
        cli(["run", "--all", "--timeout=-5s", "--", "true"]),
      ]);
      expectOneLine(negative, /^rexmesh: --timeout needs a value, and "-5s" starts with "-": write --timeout=-5s if that is the value$/m);
      expectOneLine(missingValue, /^rexmesh: --target needs a value$/m);
      expectOneLine(unknown, /^rexmesh: unknown option --frobnicate \(--help lists the options\)$/m);
      expectOneLine(equals, /^rexmesh: --timeout "-5s" is not a duration/m);
    });

    it("update's wave options are refused under their own names, before any connection", async () => {
      const [canary, inFlight, failures] = await Promise.all([
        cli(["update", "--to", "0.2.0", "--all", "--canary", "0"]),
        cli(["update", "--to", "0.2.0", "--all", "--max-in-flight", "150%"]),
        cli(["update", "--to", "0.2.0", "--all", "--max-failures", "many"]),
      ]);
      for (const r of [canary, inFlight, failures]) expect(r.code).toBe(2);
      expectOneLine(canary, /^rexmesh: --canary must be a whole number of at least 1, not "0"$/m);
      expectOneLine(inFlight, /^rexmesh: --max-in-flight must be a whole number or a percentage like 10% of at least 1, not "150%"$/m);
      expectOneLine(failures, /^rexmesh: --max-failures must be a whole number or a percentage like 10%, not "many"$/m);
    });

    it("release keygen and sign: a signed manifest a daemon trusting the public key accepts; a key is never replaced", async () => {
      const dir = tempDir("release");
      const keygen = await cli(["release", "keygen", "--out", dir, "--json"]);
      expect(keygen.code, keygen.stderr).toBe(0);
      const { keyId } = JSON.parse(keygen.stdout) as { keyId: string };
      writeFileSync(join(dir, "daemon.tar.gz"), "release bytes");
      const signed = await cli(["release", "sign", join(dir, "daemon.tar.gz"), "--version", "0.2.0", "--key", join(dir, "release.key"), "--platform", "linux-x64", "--json"]);
      expect(signed.code, signed.stderr).toBe(0);
      const release = fromBinary(SignedReleaseSchema, readFileSync(join(dir, "daemon.tar.gz.release")));
      const manifest = verifyRelease(release, parseReleaseKeys(readFileSync(join(dir, "release.pub"), "utf8")));
      expect([manifest.version, manifest.platform, release.keyId]).toEqual(["0.2.0", "linux-x64", keyId]);
      expect(() => checkReleaseArtifact(manifest, readFileSync(join(dir, "daemon.tar.gz")))).not.toThrow();
      expectOneLine(await cli(["release", "keygen", "--out", dir]), /exists already: a release key is not replaced by accident/);
    });

    it("schedules: what only add takes is refused on the other commands, not ignored", async () => {
      const [pause, show] = await Promise.all([cli(["schedules", "pause", "x", "--misfire", "skip", "--timeout", "5s"]), cli(["schedules", "show", "x", "--", "true"])]);
      expectOneLine(pause, /^rexmesh: --misfire, --timeout: only for rexmesh schedules add$/m);
      expectOneLine(show, /^rexmesh: a command after --: only for rexmesh schedules add$/m);
    });

    it("an option before the command: the global ones are taken, any other is named with where it goes", async () => {
      const [before, after, withValue, other] = await Promise.all([
        cli(["--json", "jobs"]),
        cli(["jobs", "--json"]),
        rexmesh(["--controller", mesh.controllerAddress, "--json", "hosts"], { ...mesh.exports(), REXMESH_CONTROLLER: "127.0.0.1:1" }),
        cli(["--target", "role=web", "run", "--", "true"]),
      ]);
      expect(before.code, before.stderr).toBe(0);
      expect(JSON.parse(before.stdout)).toEqual(JSON.parse(after.stdout));
      expect(withValue.code, withValue.stderr).toBe(0);
      expect((JSON.parse(withValue.stdout) as { id: string }[]).map((h) => h.id).sort()).toEqual(["h1", "h2", "h3"]);
      expectOneLine(other, /^rexmesh: --target before the command: only --controller, .*--json may come first; put it after the command \(rexmesh run --target \.\.\.\)$/m);
    });
  });

  describe("no silent surprises", () => {
    it("zero for a limit or a duration is refused, not taken as 'no limit' or 'the default'", async () => {
      const cases: [string[], RegExp][] = [
        [["--concurrency", "0"], /--concurrency must be at least 1, not "0" \(leave it out for no limit\)/],
        [["--concurrency", "0%"], /--concurrency must be at least 1%, not "0%"/],
        [["--concurrency", "150%"], /--concurrency must be a percentage from 1% to 100%/],
        [["--concurrency-per-region", "0"], /--concurrency-per-region must be at least 1/],
        [["--batch", "0"], /--batch must be at least 1/],
        [["--output-limit", "0"], /--output-limit must be at least 1/],
        [["--deadline", "0s"], /--deadline must be more than 0, not "0s" \(leave it out for the controller's default\)/],
        [["--timeout", "0"], /--timeout must be more than 0/],
        [["--lost-after", "0m"], /--lost-after must be more than 0/],
      ];
      const runs = await Promise.all(cases.map(([flags]) => cli(["run", "--all", ...flags, "--dry-run", "--", "true"])));
      runs.forEach((r, i) => expectOneLine(r, cases[i]![1]));
      expectOneLine(await cli(["ping", "--all", "--timeout", "0s"]), /--timeout must be more than 0/);
      // --max-errors 0 means something: no failure tolerated.
      const strict = await cli(["run", "--all", "--max-errors", "0", "--dry-run", "--", "true"]);
      expect(strict.code, strict.stderr).toBe(0);
    });

    it("a run that waits for a host that is not connected says so on stderr, naming it and how to follow the job", async () => {
      const daemon = mesh.daemons.find((d) => d.hosts.includes("h3"))!;
      await mesh.kill(daemon);
      try {
        await until("h3 disconnected", async () => {
          const { stdout } = await cli(["hosts", "--json"]);
          return (JSON.parse(stdout) as { id: string; connection: string }[]).find((h) => h.id === "h3")?.connection !== "CONNECTION_STATE_CONNECTED" || undefined;
        });
        const r = await cli(["run", "-H", "h1,h3", "--deadline", "6s", "--", "echo", "here"]);
        expect(r.code).toBe(1); // h3's task ends EXPIRED
        expect(r.stdout).toMatch(/^h1 out\| here$/m);
        expect(r.stderr).toMatch(/^rexmesh: waiting for 1 host that is not connected: h3 \(a task runs when its host returns, or ends EXPIRED at its delivery deadline; Ctrl-C stops watching and leaves the job running: rexmesh jobs watch j\S+\)$/m);
        // h1 is connected: not named (as a word: a random job id may hold the letters "h1").
        expect(r.stderr).not.toMatch(/\bh1\b/);
      } finally {
        await mesh.restart(daemon);
        await mesh.waitForHosts(3);
      }
    });

    it("a run whose controller restarts mid-job watches again and prints every line once, not a raw stream error", async () => {
      const running = cli(["run", "-H", "h1", "--shell", "for i in $(seq 1 12); do echo line$i; sleep 0.4; done"]);
      const { client, close } = clientOf(mesh);
      try {
        await until("the job's output to start", async () => {
          const { jobs } = await client.listJobs({ limit: 1 });
          const counts = jobs[0]?.counts ?? [];
          return counts.some((c) => c.state === TaskState.RUNNING) || undefined;
        });
      } finally {
        close();
      }
      await mesh.kill(mesh.controller);
      await mesh.restart(mesh.controller);
      const r = await running;
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout.match(/^h1 out\| line\d+$/gm)).toEqual(Array.from({ length: 12 }, (_, i) => `h1 out| line${i + 1}`));
      expect(r.stderr).toMatch(/^rexmesh: lost the watch of job j\S+ \(\w+: .*\); the job goes on at the controller, watching again\.\.\.$/m);
      await mesh.waitForHosts(3);
    });

    it("an empty host query is refused by hosts, run and ping alike", async () => {
      const runs = await Promise.all([cli(["hosts", "-t", ""]), cli(["run", "-t", "", "--", "true"]), cli(["ping", "-t", " "]), cli(["hosts", "--target="])]);
      for (const r of runs) expectOneLine(r, /^rexmesh: -t\/--target needs a query, e\.g\. 'role=web'; an empty one is refused \(use --all for every host\)$/m);
    });

    it("a parameter that is not a list, given twice, is named; a list parameter takes repeats", async () => {
      const file = join(work, "twice.json");
      writeFileSync(file, JSON.stringify({ name: "twice", parameters: [{ name: "x", type: "string", pattern: "[0-9]+" }, { name: "l", type: "list", default: [] }], steps: [{ exec: { argv: ["echo", "{{param.x}}", "{{param.l}}"] } }] }));
      expect((await cli(["docs", "put", file])).code).toBe(0);
      // Stored all the same, with a warning on stderr where a value would be parsed again as shell code.
      const evalFile = join(work, "evals.json");
      writeFileSync(evalFile, JSON.stringify({ name: "evals", parameters: [{ name: "x", type: "string" }], steps: [{ shell: { script: "eval {{param.x}}" } }] }));
      const evals = await cli(["docs", "put", evalFile]);
      expect(evals.code).toBe(0);
      expect(evals.stdout).toBe("stored evals@1\n");
      expect(evals.stderr).toMatch(/^rexmesh: warning: evals@1 step 1: field shell\.script line 1: a placeholder after eval is quoted once and then parsed again as code/);
      const [twice, thrice, list] = await Promise.all([
        cli(["run", "--all", "--doc", "twice", "-p", "x=1", "-p", "x=2", "--dry-run"]),
        cli(["run", "--all", "--doc", "twice@1", "-p", "x=1", "-p", "x=2", "-p", "x=3", "--dry-run"]),
        cli(["run", "-H", "h1", "--doc", "twice", "-p", "x=1", "-p", "l=a", "-p", "l=b", "--dry-run"]),
      ]);
      expectOneLine(twice, /^rexmesh: parameter x given twice \(-p x=\.\.\.\), but it is a string, not a list: give it once$/m);
      expectOneLine(thrice, /parameter x given 3 times/);
      expect(list.code, list.stderr).toBe(0);
      expect(list.stdout).toContain('1. exec ["echo","1","a","b"]');
    });
  });

  it("shell against a controller started without --sessions is refused in one line saying how to turn them on", async () => {
    const r = await cli(["shell", "h1", "--", "true"]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/^rexmesh: FailedPrecondition: sessions are off at this controller: it serves them \(and port forwards\) when started with --sessions \(read docs\/sessions\.md, Known gaps, first\)\n$/);
  });

  it("-b groups hosts by stream and outcome: a failure on stderr never joins successes on stdout", async () => {
    const script = 'if [ "$REXMESH_HOST_ID" = h1 ]; then echo x >&2; exit 3; else echo x; fi';
    const r = await cli(["run", "--all", "-b", "--shell", script]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stdout).toMatch(/^==== 2 hosts: h2, h3\nx\n==== 1 host: h1 \(FAILED, exit 3\)\nerr\| x\n/);
    // Both streams on every host, same outcome: one block, the streams told apart.
    const both = await cli(["run", "--all", "-b", "--shell", "echo a; echo b >&2"]);
    expect(both.code, both.stderr).toBe(0);
    expect(both.stdout).toMatch(/^==== 3 hosts: h1, h2, h3\nout\| a\nerr\| b\n/);
  });

  it("run names the task of every host that did not succeed; jobs show has a TASK column; jobs lists under a header", async () => {
    const r = await cli(["run", "--all", "--shell", '[ "$REXMESH_HOST_ID" != h2 ]']);
    expect(r.code).toBe(1);
    const jobId = /\(job (\S+)\)/.exec(r.stdout)![1]!;
    const { client, close } = clientOf(mesh);
    const { tasks } = await client.getJob({ jobId }).finally(close);
    const h2 = tasks.find((t) => t.hostId === "h2")!;
    expect(r.stdout).toMatch(new RegExp(`^ {2}h2 \\[east\\] FAILED: exit code 1 {2}\\(task ${h2.id}\\)$`, "m"));
    const show = await cli(["jobs", "show", jobId]);
    expect(show.code, show.stderr).toBe(0);
    expect(show.stdout).toMatch(/^ {2}TASK +HOST +REGION +STATE$/m);
    for (const t of tasks) expect(show.stdout).toMatch(new RegExp(`^ {2}${t.id} +${t.hostId} +east +(SUCCEEDED|FAILED)`, "m"));
    const list = await cli(["jobs"]);
    expect(list.code, list.stderr).toBe(0);
    const [header, ...rows] = list.stdout.trimEnd().split("\n");
    expect(header).toMatch(/^JOB +STATE +CREATED +TASKS +COUNTS +SCHEDULE$/);
    expect(rows.find((l) => l.startsWith(jobId))).toMatch(new RegExp(`^${jobId} +DONE +\\S+ +3 +.*FAILED=1`));
  });

  it("dry runs print file.put and script steps in words, the mode in octal", async () => {
    const file = join(work, "app.conf");
    writeFileSync(file, "listen 80;\n");
    const digest = (await cli(["artifacts", "put", file])).stdout.trim();
    expect(digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    const [put, plain, script] = await Promise.all([
      cli(["run", "-H", "h1", "--put", digest, "--to", "app.conf", "--base-dir", work, "--mode", "640", "--dry-run"]),
      cli(["run", "-H", "h1", "--put", digest, "--to", "app.conf", "--base-dir", work, "--dry-run"]),
      cli(["run", "-H", "h1", "--script", digest, "--dry-run", "--", "--verbose", "x"]),
    ]);
    expect(put.code, put.stderr).toBe(0);
    expect(put.stdout).toContain(`  1. file.put ${digest} to app.conf in ${work}, mode 0640\n`);
    expect(plain.stdout).toContain(`  1. file.put ${digest} to app.conf in ${work}, mode 0644 (default)\n`);
    expect(script.stdout).toContain(`  1. script ${digest} args ["--verbose","x"]\n`);
    for (const r of [put, plain, script]) expect(r.stdout).not.toMatch(/[{}]|416/);
  });

  it("docs list has a header and shows every document's versions", async () => {
    const file = join(work, "listed.json");
    writeFileSync(file, JSON.stringify({ name: "listed", description: "listed twice", steps: [{ exec: { argv: ["true"] } }] }));
    expect((await cli(["docs", "put", file])).code).toBe(0);
    expect((await cli(["docs", "put", file])).code).toBe(0);
    const r = await cli(["docs", "list"]);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trimEnd().split("\n");
    expect(lines[0]).toMatch(/^NAME +VERSIONS +UPDATED +BY +DESCRIPTION$/);
    expect(r.stdout).toMatch(/^listed +1\.\.2 +\d{4}-\d\d-\d\dT\S+ +operator:default\/dev +listed twice$/m);
  });

  it("bundle export for a region with no known host is refused with the regions that have hosts, and writes no file", async () => {
    const file = join(work, "nowhere.rxb");
    const r = await cli(["bundle", "export", "--region", "nowhere", file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/no host of tenant default is known in region nowhere \(regions with hosts: east\)/);
    expect(existsSync(file)).toBe(false);
  });

  it("revoking a host this controller never saw says so (and still revokes it); a host it knows gets no such note", async () => {
    const unknown = await cli(["hosts", "revoke", "no-such-host", "--reason", "typo?"]);
    expect(unknown.code, unknown.stderr).toBe(0);
    expect(unknown.stdout).toMatch(/^revoked host no-such-host \(deny-list version \d+\)$/m);
    expect(unknown.stderr).toMatch(/^note: no host no-such-host has ever connected to this controller; it is revoked all the same/m);
    const json = await cli(["hosts", "revoke", "no-such-host-2", "--json"]);
    expect(JSON.parse(json.stdout)).toMatchObject({ revoked: "no-such-host-2", unknownHost: true });
    // Last in this file: h3 is revoked for good.
    const known = await cli(["hosts", "revoke", "h3"]);
    expect(known.code, known.stderr).toBe(0);
    expect(known.stderr).toBe("");
  });
});
