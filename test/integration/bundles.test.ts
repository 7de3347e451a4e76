import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fromBinary } from "@bufbuild/protobuf";
import { credentialPaths } from "../../certs/files.js";
import { LocalMesh } from "../../cli/launcher.js";
import { isTerminal } from "../../common/task-state.js";
import { digestOf } from "../../common/digest.js";
import { peekSpec } from "../../common/task-signing.js";
import { BundlePayloadSchema, BundleSchema } from "../../gen/rexmesh/v1/bundle_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * A site with no link at all: its proxy's controller address leads nowhere.
 * Work goes in and results come out only as signed files, carried by hand.
 */
describe("bundles through an air-gapped proxy", () => {
  const hosts = ["a1", "a2", "a3"];
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("bundles"), regions: ["air"], hosts: hosts.map((id) => ({ id, region: "air" })), hostsPerProcess: 3 });
  const files = () => join(mesh.dir, "carried");
  const marks = () => join(mesh.dir, "marks");
  let site: string[];

  const payloadOf = (file: string) => fromBinary(BundlePayloadSchema, fromBinary(BundleSchema, readFileSync(file)).payload);
  const atSite = (args: string[]) => rexmesh(["proxy", "bundle", ...args, ...site]);
  const atController = (args: string[]) => rexmesh(["bundle", ...args], mesh.exports());

  beforeAll(async () => {
    mesh.prepare();
    mkdirSync(files(), { recursive: true });
    mkdirSync(marks(), { recursive: true });
    await mesh.startController();
    mesh.controllerAddressForProxies = "127.0.0.1:1"; // nothing listens there: no link, ever
    await mesh.startProxies();
    await mesh.startDaemons();
    const px = credentialPaths(join(mesh.dir, "identities"), "proxy-air");
    site = ["--proxy", mesh.proxies[0]!.address!, "--cert", px.cert, "--key", px.key, "--ca", px.ca];
    // The site's daemons have connected to their proxy once its results bundle lists them.
    for (let i = 0; i < 200; i++) {
      const r = await atSite(["export-results", join(files(), "hello.rxb")]);
      expect(r.code, r.stderr).toBe(0);
      if (payloadOf(join(files(), "hello.rxb")).hosts.length === hosts.length) return;
      await new Promise((res) => setTimeout(res, 50));
    }
    throw new Error("the site's hosts never connected to their proxy");
  }, 120_000);
  afterAll(() => mesh.stop());

  it("carries tasks in and results out; a second import changes nothing; tampered bundles are refused", async () => {
    // 1. The controller learns the site's hosts from its first results bundle.
    const hello = await atController(["import", join(files(), "hello.rxb")]);
    expect(hello.stdout, hello.stderr).toMatch(/3 hosts reported/);
    const conn = clientOf(mesh);
    try {
      const listed = (await conn.client.listHosts({})).hosts;
      expect(listed.map((h) => `${h.id}@${h.region}`).sort()).toEqual(["a1@air", "a2@air", "a3@air"]);

      // 2. A job for the site; its tasks wait at the controller.
      const script = 'echo "$REXMESH_TASK_ID" >> "$MARK/$REXMESH_TASK_ID"; f=$(mktemp); head -c 50000 /dev/urandom > "$f"; sha256sum "$f" | cut -d" " -f1 >&2; cat "$f"; rm -f "$f"';
      const { job } = await conn.client.submitJob({ allHosts: true, env: { MARK: marks() }, steps: [{ tool: { case: "shell", value: { script } } }] });

      // 3. Tasks out, signed by the controller.
      const tasksFile = join(files(), "tasks.rxb");
      const out = await atController(["export", "--region", "air", tasksFile]);
      expect(out.stdout, out.stderr).toMatch(/^3 tasks for region air/);
      expect(payloadOf(tasksFile).tasks.map((t) => peekSpec(t)?.hostId).sort()).toEqual(hosts);

      // 4. A tampered copy is refused at the site; the real one is taken; taking it again adds nothing.
      const raw = readFileSync(tasksFile);
      const tampered = Buffer.from(raw);
      const at = tampered.indexOf(Buffer.from("head -c 50000"));
      tampered[at + 8] = 0x39; // "50000" → "90000": the command was altered
      writeFileSync(join(files(), "tampered.rxb"), tampered);
      const refused = await atSite(["import", join(files(), "tampered.rxb")]);
      expect(refused.code).not.toBe(0);
      expect(refused.stderr).toMatch(/PermissionDenied.*altered after signing/);
      const first = await atSite(["import", tasksFile]);
      expect(first.stdout, first.stderr).toMatch(/3 new tasks, 0 already known/);
      const second = await atSite(["import", tasksFile]);
      expect(second.stdout).toMatch(/0 new tasks, 3 already known/);

      // 5. The site runs them; results out once every task has ended there.
      const resultsFile = join(files(), "results.rxb");
      for (let i = 0; ; i++) {
        expect((await atSite(["export-results", resultsFile])).code).toBe(0);
        const done = payloadOf(resultsFile).statuses.filter((s) => isTerminal(s.state)).length;
        if (done === hosts.length) break;
        if (i > 400) throw new Error(`only ${done} tasks ended at the site`);
        await new Promise((res) => setTimeout(res, 50));
      }

      // 6. Tampered results are refused at the controller; the real ones finish the job.
      const res = Buffer.from(readFileSync(resultsFile));
      res[res.length - 40] = res[res.length - 40]! ^ 0xff; // inside the signer certificate or signature
      writeFileSync(join(files(), "tampered-results.rxb"), res);
      const bad = await atController(["import", join(files(), "tampered-results.rxb")]);
      expect(bad.code).not.toBe(0);
      const imported = await atController(["import", resultsFile]);
      expect(imported.stdout, imported.stderr).toMatch(/imported .*: [1-9]\d* statuses/);
      const r = await collectJob(conn.client, job!.id);
      for (const h of hosts) {
        const t = r.tasks.get(h)!;
        expect(t.state, `${h}: ${t.message}`).toBe(TaskState.SUCCEEDED);
        expect(createHash("sha256").update(r.stdout.get(h)!).digest("hex")).toBe(r.stderr.get(h)!.toString().trim());
        expect(readFileSync(join(marks(), t.id), "utf8").trim().split("\n")).toHaveLength(1);
      }
      const before = await conn.client.getJob({ jobId: job!.id });

      // 7. Importing the same results again changes nothing.
      const again = await atController(["import", resultsFile]);
      expect(again.stdout).toMatch(/0 statuses and 0 output chunks applied/);
      const after = await conn.client.getJob({ jobId: job!.id });
      expect(after.tasks.map((t) => [t.id, t.state, t.outputChunks])).toEqual(before.tasks.map((t) => [t.id, t.state, t.outputChunks]));

      // 8. The next tasks bundle carries the controller's acks: the site drops what came home.
      const acks = join(files(), "acks.rxb");
      await atController(["export", "--region", "air", acks]);
      expect(payloadOf(acks).statusAcks.length).toBeGreaterThan(0);
      expect((await atSite(["import", acks])).code).toBe(0);
      await atSite(["export-results", resultsFile]);
      expect(payloadOf(resultsFile).statuses).toHaveLength(0);
      // 9. The first tasks bundle imported once more after its results came home: the site
      // remembers the tasks ended there and queues nothing again.
      const replay = await atSite(["import", tasksFile]);
      expect(replay.stdout, replay.stderr).toMatch(/0 new tasks, 3 already known/);
      await atSite(["export-results", resultsFile]);
      expect(payloadOf(resultsFile).statuses).toHaveLength(0);
      expect(readdirSync(marks())).toHaveLength(3);
    } finally {
      conn.close();
    }
  });

  it("carries the artifacts its tasks fetch beside the bundle into the site proxy's cache; without them the import is refused", async () => {
    const conn = clientOf(mesh);
    try {
      const content = Buffer.concat([Buffer.from("carried by hand\n"), randomBytes(3 * 1024 * 1024 + 17)]); // more than one slice
      const source = join(files(), "payload.bin");
      writeFileSync(source, content);
      const put = await rexmesh(["artifacts", "put", source], mesh.exports());
      expect(put.code, put.stderr).toBe(0);
      const digest = put.stdout.trim();
      const base = join(mesh.dir, "put");
      mkdirSync(base, { recursive: true });
      const { job } = await conn.client.submitJob({ allHosts: true, steps: [{ tool: { case: "filePut", value: { artifact: digest, path: "payload.bin", baseDir: base, mode: 0o600 } } }] });
      const tasksFile = join(files(), "artifact-tasks.rxb");
      const out = await atController(["export", "--region", "air", tasksFile]);
      expect(out.stdout, out.stderr).toMatch(/^3 tasks for region air written to .*, with 1 artifact\(s\) in .*artifact-tasks.rxb.artifacts\//);
      expect(payloadOf(tasksFile).artifacts).toEqual([digest]);
      const carried = join(`${tasksFile}.artifacts`, digest.slice("sha256:".length));
      // Compared as digests: vitest's deep equality takes seconds per megabyte.
      expect(digestOf(readFileSync(carried))).toBe(digest);

      // Without the artifacts beside it, nothing is imported (the tasks could never fetch them).
      const lone = join(files(), "lone.rxb");
      writeFileSync(lone, readFileSync(tasksFile));
      const refused = await atSite(["import", lone]);
      expect(refused.code).not.toBe(0);
      expect(refused.stderr).toContain(`need 1 artifact(s) that are not beside it: ${join(`${lone}.artifacts`, digest.slice(7))}`);
      // A carried artifact altered on the way is refused by the proxy (its digest), and the tasks are not imported.
      mkdirSync(`${lone}.artifacts`);
      const altered = Buffer.from(content);
      altered[5]! ^= 1;
      writeFileSync(join(`${lone}.artifacts`, digest.slice(7)), altered);
      const bad = await atSite(["import", lone]);
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/digest|hash/i);

      const imported = await atSite(["import", tasksFile]);
      expect(imported.stdout, imported.stderr).toMatch(/3 new tasks, 0 already known, 1 artifact\(s\) in the proxy's cache/);
      const ids = new Set((await conn.client.getJob({ jobId: job!.id })).tasks.map((t) => t.id));
      const resultsFile = join(files(), "artifact-results.rxb");
      for (let i = 0; ; i++) {
        expect((await atSite(["export-results", resultsFile])).code).toBe(0);
        const ended = payloadOf(resultsFile).statuses.filter((st) => isTerminal(st.state) && ids.has(st.taskId));
        if (ended.length === hosts.length) break;
        if (i > 400) throw new Error(`only ${ended.length} file.put tasks ended at the site`);
        await new Promise((res) => setTimeout(res, 50));
      }
      expect((await atController(["import", resultsFile])).code).toBe(0);
      const r = await collectJob(conn.client, job!.id);
      for (const h of hosts) expect(r.tasks.get(h)!.state, `${h}: ${r.tasks.get(h)!.message}`).toBe(TaskState.SUCCEEDED);
      expect(digestOf(readFileSync(join(base, "payload.bin")))).toBe(digestOf(content));
    } finally {
      conn.close();
    }
  });
});
