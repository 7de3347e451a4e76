import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { readCredentials } from "../../certs/files.js";
import { clientFor, openChannel } from "../../common/connect-dial.js";
import { openFrameLink } from "../../common/connect-link.js";
import type { FrameLink } from "../../common/frame-link.js";
import { createGrpcLinkServer, type GrpcLinkServer, type LinkHandler } from "../../common/grpc-link.js";
import { silentLogger } from "../../common/logger.js";
import { peekSessionOrder, peekSpec } from "../../common/task-signing.js";
import type { PeerIdentity } from "../../certs/identity.js";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import {
  AgentLinkService,
  AgentSessionResponseSchema,
  AgentStreamResponseSchema,
  type AgentSessionRequest,
  type AgentSessionResponse,
  type AgentStreamRequest,
  type AgentStreamResponse,
} from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ResultCheck, SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import {
  ProxyLinkService,
  ProxySessionRequestSchema,
  ProxyStreamRequestSchema,
  type ProxySessionRequest,
  type ProxySessionResponse,
  type ProxyStreamRequest,
  type ProxyStreamResponse,
} from "../../gen/rexmesh/v1/proxy_link_pb.js";
import type { SessionFrame } from "../../gen/rexmesh/v1/session_pb.js";
import { SignedTaskSchema, StatusAckSchema, TaskSpecSchema, TaskState, type SignedTask, type TaskSigningKey, type TaskStatus } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * A proxy with a valid proxy certificate that misbehaves: it relays like a
 * proxy, but can alter a task's bytes or hand one host's task to another.
 * The controller (real) signs; the daemons (real processes) must refuse.
 */
class EvilProxy {
  readonly hosts = new Map<string, FrameLink<AgentStreamResponse, AgentStreamRequest>>();
  readonly seen: { host: string; status: TaskStatus }[] = [];
  /** What each host's hello said: its report key (what a proxy could try to reuse). */
  readonly hellos = new Map<string, AgentStreamRequest>();
  keys: TaskSigningKey[] = [];
  mode: {
    alter?: string;
    replayTo?: string;
    forgeOutput?: boolean;
    forgeExit?: boolean;
    /** Set the exit code of every end it relays to 0, leaving the rest as the host said. */
    zeroExit?: boolean;
    /** Strip what vouches for an end: its signature or its MAC. */
    stripSignature?: boolean;
    /** Also hand a copy of `from`'s task, readdressed to `to`, to `to` (a leaf its batch never had). */
    retarget?: { from: string; to: string };
    /** Give this host's task the batch proof and signature of the task it was sent before (another job's). */
    foreignProof?: string;
  } = {};
  /** Per task id: the batch proof it came with from the controller. */
  readonly proofs = new Map<string, { leaves: number; index: number; path: number; signature: string }>();
  /** Per host: the signature and proof of the last batched task relayed to it. */
  private readonly lastBatched = new Map<string, Pick<SignedTask, "signature" | "keyId" | "batch">>();
  /** Sessions: flip a bit of what goes to the host, or hold the host's leg and never join the controller. */
  sessionMode: { flip?: boolean; hold?: boolean } = {};
  /** Every byte of session data and urgent records this proxy relayed, and the hosts whose legs it took. */
  readonly sessionBytes: Buffer[] = [];
  readonly sessionLegs: string[] = [];
  nonce: Uint8Array | undefined;
  up!: FrameLink<ProxyStreamRequest, ProxyStreamResponse>;
  server!: GrpcLinkServer;
  address = "";

  constructor(private readonly controller: string, private readonly creds: ReturnType<typeof readCredentials>) {}

  async start(): Promise<void> {
    this.server = createGrpcLinkServer({
      creds: this.creds,
      log: silentLogger,
      links: [{ method: AgentLinkService.method.agentSession, serve: (link, peer) => this.serveSession(link as never, peer) } as LinkHandler],
      method: AgentLinkService.method.agentStream,
      serve: async (link, peer) => {
        this.hosts.set(peer.id, link);
        link.send(create(AgentStreamResponseSchema, { welcome: { proxy: "px-evil", region: "evil", heartbeatMs: 60_000 }, signingKeys: this.keys, presenceNonce: this.nonce }));
        for await (const frame of link.incoming) {
          if (frame.hello) this.hellos.set(peer.id, frame);
          // Presence is relayed faithfully: the host's own proof over the controller's nonce.
          if (frame.presenceProof.length > 0) {
            const { reportKey, facts } = this.hellos.get(peer.id)?.hello ?? {};
            this.up.send(create(ProxyStreamRequestSchema, { hosts: [{ hostId: peer.id, tenant: peer.scope, connected: true, facts, reportKey, proof: frame.presenceProof, proofSalt: frame.presenceSalt }] }));
          }
          for (const s of frame.statuses) this.seen.push({ host: peer.id, status: s });
          if (frame.statuses.length || frame.output.length) {
            const statuses = frame.statuses.filter((s) => peekOwner(s) === peer.id || !this.mode.replayTo);
            for (const s of statuses) {
              if (this.mode.forgeExit && s.state === TaskState.FAILED) {
                s.state = TaskState.SUCCEEDED;
                s.exitCode = 0;
              }
              if (this.mode.zeroExit && s.exitCode !== undefined) s.exitCode = 0;
              if (this.mode.stripSignature) {
                s.signature = new Uint8Array();
                s.endMac = new Uint8Array();
                s.endMacKeyId = "";
              }
            }
            const output = frame.output.map((c) => (this.mode.forgeOutput ? { ...c, data: new TextEncoder().encode("all good\n") } : c));
            this.up.send(create(ProxyStreamRequestSchema, { statuses, output }));
            link.send(create(AgentStreamResponseSchema, { statusAcks: frame.statuses.map((s) => create(StatusAckSchema, { taskId: s.taskId, state: s.state })), outputAcks: frame.output.map((c) => ({ taskId: c.taskId, seq: c.seq })) }));
          }
        }
      },
    });
    this.address = `127.0.0.1:${await this.server.listen("127.0.0.1", 0)}`;
    const channel = openChannel(this.controller, this.creds, ["controller"]);
    const client = clientFor(ProxyLinkService, channel);
    this.dialSession = () => openFrameLink<ProxySessionRequest, ProxySessionResponse>((out, signal) => client.proxySession(out, { signal }), () => undefined);
    this.up = openFrameLink<ProxyStreamRequest, ProxyStreamResponse>((out, signal) => client.proxyStream(out, { signal }), () => channel.close());
    this.up.send(create(ProxyStreamRequestSchema, { hello: { name: "px-evil", region: "evil", heartbeatMs: 60_000 } }));
    void (async () => {
      for await (const frame of this.up.incoming) {
        if (frame.welcome) {
          this.nonce = frame.welcome.presenceNonce;
          for (const h of this.hosts.values()) h.send(create(AgentStreamResponseSchema, { presenceNonce: this.nonce }));
        }
        if (frame.signingKeys.length) this.keys = frame.signingKeys;
        for (const signed of frame.tasks) this.relay(signed);
        // Session orders go to their host unchanged (they are signed); the host dials back with its leg.
        for (const order of frame.sessions) this.hosts.get(peekSessionOrder(order)?.hostId ?? "")?.send(create(AgentStreamResponseSchema, { sessions: [order], signingKeys: this.keys }));
      }
    })().catch(() => undefined);
  }

  private dialSession!: () => FrameLink<ProxySessionRequest, ProxySessionResponse>;

  /**
   * A host's session leg, relayed frame by frame to a leg of its own at the
   * controller (offsets and grants pass end to end), with what it does to
   * them by `sessionMode`.
   */
  private async serveSession(link: FrameLink<AgentSessionResponse, AgentSessionRequest>, peer: PeerIdentity): Promise<void> {
    const from = link.incoming[Symbol.asyncIterator]();
    const first = await from.next();
    if (first.done) return;
    this.sessionLegs.push(peer.id);
    if (this.sessionMode.hold) {
      // Keeps the host's leg, alive, and never joins the controller: a process started now would run for this proxy.
      const keepalive = setInterval(() => link.send(create(AgentSessionResponseSchema, { frame: {} })), 1000);
      await link.closed;
      clearInterval(keepalive);
      return;
    }
    const up = this.dialSession();
    up.send(create(ProxySessionRequestSchema, { sessionId: first.value.sessionId, key: first.value.key, frame: first.value.frame }));
    const note = (f: SessionFrame) => this.sessionBytes.push(...f.data.map((d) => Buffer.from(d.data)), Buffer.from(f.urgent));
    void (async () => {
      for await (const m of up.incoming) {
        if (!m.frame) continue;
        note(m.frame);
        if (this.sessionMode.flip) for (const d of m.frame.data) d.data[d.data.length - 1]! ^= 1;
        link.send(create(AgentSessionResponseSchema, { frame: m.frame }));
      }
    })()
      .catch(() => undefined)
      .finally(() => link.close());
    for (let r = await from.next(); !r.done; r = await from.next()) {
      if (!r.value.frame) continue;
      note(r.value.frame);
      up.send(create(ProxySessionRequestSchema, { frame: r.value.frame }));
    }
    up.close();
  }

  private relay(signed: SignedTask): void {
    const spec = peekSpec(signed)!;
    // Whose task it is, known before any host has it: a host's end can come back before the test's submit returns.
    owners.set(spec.taskId, spec.hostId);
    let out = signed;
    if (signed.batch) {
      const { leaves, index, path } = signed.batch;
      this.proofs.set(spec.taskId, { leaves, index, path: path.length, signature: Buffer.from(signed.signature).toString("hex") });
      const earlier = this.lastBatched.get(spec.hostId);
      this.lastBatched.set(spec.hostId, { signature: signed.signature, keyId: signed.keyId, batch: signed.batch });
      if (this.mode.foreignProof === spec.hostId && earlier) out = create(SignedTaskSchema, { ...signed, ...earlier });
    }
    const retarget = this.mode.retarget;
    if (retarget?.from === spec.hostId) {
      // The same task, readdressed to another host of the region, its proof and signature kept.
      const moved = fromBinary(TaskSpecSchema, signed.spec);
      moved.hostId = retarget.to;
      this.hosts.get(retarget.to)?.send(create(AgentStreamResponseSchema, { tasks: [create(SignedTaskSchema, { ...signed, spec: toBinary(TaskSpecSchema, moved) })], signingKeys: this.keys }));
    }
    if (this.mode.alter === spec.hostId) {
      // Change the command, keep the signature: exactly what a compromised relay would try.
      const altered = fromBinary(TaskSpecSchema, signed.spec);
      altered.steps = [{ $typeName: "rexmesh.v1.Step", name: "", tool: { case: "shell", value: { $typeName: "rexmesh.v1.ShellTool", script: 'echo "$REXMESH_HOST_ID" >> "$MARK/pwned"', interpreter: [] } } }];
      out = create(SignedTaskSchema, { ...signed, spec: toBinary(TaskSpecSchema, altered) });
    }
    // Keys go with the tasks: hosts may have connected before the controller's welcome brought them.
    this.hosts.get(spec.hostId)?.send(create(AgentStreamResponseSchema, { tasks: [out], signingKeys: this.keys }));
    if (this.mode.replayTo) this.hosts.get(this.mode.replayTo)?.send(create(AgentStreamResponseSchema, { tasks: [signed], signingKeys: this.keys }));
  }
}

const owners = new Map<string, string>();
const peekOwner = (s: TaskStatus) => owners.get(s.taskId);

describe("signed tasks and sealed sessions: a proxy can delay work but never forge or redirect it", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("signed"), regions: [], hosts: [], controllerArgs: ["--sessions"] });
  const daemons: ChildProcess[] = [];
  let evil: EvilProxy;
  const marks = () => join(mesh.dir, "marks");

  beforeAll(async () => {
    mesh.prepare();
    mkdirSync(marks(), { recursive: true });
    await mesh.startController();
    const px = mesh.issue({ role: "proxy", scope: "evil", id: "px-evil" }, join(mesh.dir, "evil"), true);
    evil = new EvilProxy(mesh.controllerAddress, readCredentials(px));
    await evil.start();
    for (const id of ["s1", "s2"]) {
      const c = mesh.issue({ role: "host", scope: "default", id }, join(mesh.dir, "hosts-evil"));
      daemons.push(
        spawn(process.execPath, [REXMESH_BIN, "daemon", "--proxies", evil.address, "--cert", c.cert, "--key", c.key, "--ca", c.ca, "--data", join(mesh.dir, "data", id)], {
          stdio: "ignore",
          // Sessions inherit the daemon's environment: where they leave their marks.
          env: { ...process.env, MARK: marks() },
        }),
      );
    }
    await mesh.waitForHosts(2);
  }, 60_000);

  afterAll(async () => {
    for (const d of daemons) d.kill("SIGTERM");
    await evil?.server.close(100);
    await mesh.stop();
  });

  const submit = async (...hosts: string[]) => {
    const conn = clientOf(mesh);
    const { job } = await conn.client.submitJob(
      create(SubmitJobRequestSchema, { hostIds: hosts, env: { MARK: marks() }, steps: [{ tool: { case: "shell", value: { script: 'echo "$REXMESH_HOST_ID" >> "$MARK/$REXMESH_TASK_ID"' } } }] }),
    );
    return { conn, job: job! };
  };

  it("a job on several hosts is signed once for all: each host checks its own proof and runs its own task", async () => {
    evil.mode = {};
    const { conn, job } = await submit("s1", "s2");
    try {
      const r = await collectJob(conn.client, job.id);
      const [t1, t2] = [r.tasks.get("s1")!, r.tasks.get("s2")!];
      expect([TaskState[t1.state], TaskState[t2.state]]).toEqual(["SUCCEEDED", "SUCCEEDED"]);
      const [p1, p2] = [evil.proofs.get(t1.id)!, evil.proofs.get(t2.id)!];
      expect(p1).toMatchObject({ leaves: 2, path: 1 });
      expect(p2).toMatchObject({ leaves: 2, path: 1 });
      expect(p1.signature).toBe(p2.signature);
      expect(new Set([p1.index, p2.index])).toEqual(new Set([0, 1]));
      expect(readFileSync(join(marks(), t1.id), "utf8")).toBe("s1\n");
      expect(readFileSync(join(marks(), t2.id), "utf8")).toBe("s2\n");
    } finally {
      conn.close();
    }
  });

  it("a batched task altered on the way, or moved to a host its batch does not name, is REJECTED and runs nowhere", async () => {
    evil.mode = { alter: "s2", retarget: { from: "s1", to: "s2" } };
    const { conn, job } = await submit("s1", "s2");
    try {
      const r = await collectJob(conn.client, job.id);
      const [t1, t2] = [r.tasks.get("s1")!, r.tasks.get("s2")!];
      expect(evil.proofs.get(t1.id)?.leaves).toBe(2);
      // s2's own task, its command changed: refused against the batch's signature.
      expect(t2.state).toBe(TaskState.REJECTED);
      expect(t2.message).toMatch(/does not match its batch: it was altered/);
      // s1's task readdressed to s2: its leaf is in no signed batch, so s2 refuses it; s1 ran its own.
      const moved = evil.seen.filter((x) => x.host === "s2" && x.status.taskId === t1.id);
      expect(moved.map((x) => TaskState[x.status.state])).toEqual(["REJECTED"]);
      expect(moved[0]!.status.message).toMatch(/does not match its batch/);
      expect(t1.state).toBe(TaskState.SUCCEEDED);
      expect(readFileSync(join(marks(), t1.id), "utf8")).toBe("s1\n");
      expect(existsSync(join(marks(), t2.id))).toBe(false);
      expect(existsSync(join(marks(), "pwned"))).toBe(false);
    } finally {
      conn.close();
    }
  });

  it("a proof and signature from another job do not carry a task: REJECTED, nothing runs", async () => {
    evil.mode = { foreignProof: "s1" };
    const { conn, job } = await submit("s1", "s2");
    try {
      const r = await collectJob(conn.client, job.id);
      const [t1, t2] = [r.tasks.get("s1")!, r.tasks.get("s2")!];
      expect(t1.state).toBe(TaskState.REJECTED);
      expect(t1.message).toMatch(/does not match its batch/);
      expect(existsSync(join(marks(), t1.id))).toBe(false);
      expect(t2.state).toBe(TaskState.SUCCEEDED);
    } finally {
      conn.close();
    }
  });

  it("a task whose command was altered on the way is REJECTED and nothing of it runs", async () => {
    evil.mode = { alter: "s1" };
    const { conn, job } = await submit("s1");
    try {
      const r = await collectJob(conn.client, job.id);
      const t = r.tasks.get("s1")!;
      expect(t.state).toBe(TaskState.REJECTED);
      expect(t.message).toMatch(/signature does not match: it was altered/);
      expect(existsSync(join(marks(), "pwned"))).toBe(false);
      expect(existsSync(join(marks(), t.id))).toBe(false);
    } finally {
      conn.close();
    }
  });

  it("a task replayed to another host is REJECTED there and runs only on its own host", async () => {
    evil.mode = { replayTo: "s2" };
    const { conn, job } = await submit("s1");
    try {
      const r = await collectJob(conn.client, job.id);
      const t = r.tasks.get("s1")!;
      expect(t.state).toBe(TaskState.SUCCEEDED);
      const onS2 = evil.seen.filter((x) => x.host === "s2" && x.status.taskId === t.id);
      expect(onS2.map((x) => TaskState[x.status.state])).toEqual(["REJECTED"]);
      expect(onS2[0]!.status.message).toMatch(/addressed to host default\/s1, not to this host/);
      expect(readFileSync(join(marks(), t.id), "utf8")).toBe("s1\n");
    } finally {
      conn.close();
    }
  });

  it("a proxy cannot claim a host it does not hold: no proof, a forged one, or another host's key are refused", async () => {
    mesh.issue({ role: "host", scope: "default", id: "s9" }, join(mesh.dir, "hosts-absent"));
    const stolen = evil.hellos.get("s1")!.hello!.reportKey!;
    evil.up.send(
      create(ProxyStreamRequestSchema, {
        hosts: [
          { hostId: "s9", tenant: "default", connected: true },
          { hostId: "s9", tenant: "default", connected: true, reportKey: stolen, proof: new Uint8Array(64).fill(1), proofSalt: new Uint8Array(16).fill(2) },
          { hostId: "s1", tenant: "default", connected: true, reportKey: stolen, proof: new Uint8Array(64).fill(1), proofSalt: new Uint8Array(16).fill(2) },
        ],
      }),
    );
    const conn = clientOf(mesh);
    try {
      await new Promise((r) => setTimeout(r, 500));
      const hosts = (await conn.client.listHosts({})).hosts;
      expect(hosts.map((h) => h.id).sort()).toEqual(["s1", "s2"]);
      const log = readFileSync(mesh.controller.logFile, "utf8");
      expect(log).toMatch(/host presence refused.*"host":"s9".*no report key/);
      expect(log).toMatch(/host presence refused.*"host":"s9".*another host/);
      expect(log).toMatch(/host presence refused.*"host":"s1".*presence proof does not hold/);
    } finally {
      conn.close();
    }
  });

  const ended = async (host: string, script: string) => {
    const conn = clientOf(mesh);
    try {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: [host], steps: [{ tool: { case: "shell", value: { script } } }] }));
      const r = await collectJob(conn.client, job!.id);
      // The output check runs once the last chunk is stored: wait for it to settle.
      for (let i = 0; i < 100; i++) {
        const t = (await conn.client.getJob({ jobId: job!.id })).tasks[0]!;
        if (t.resultCheck !== ResultCheck.OUTPUT_PENDING) return { task: t, stdout: r.stdout.get(host)?.toString() ?? "" };
        await new Promise((res) => setTimeout(res, 50));
      }
      throw new Error("the result check never settled");
    } finally {
      conn.close();
    }
  };

  it("an honest relay's results check out against the host's signature", async () => {
    evil.mode = {};
    const { task } = await ended("s1", "echo fine; exit 3");
    expect(task.state).toBe(TaskState.FAILED);
    expect(task.resultCheck).toBe(ResultCheck.VERIFIED);
  });

  it("output altered on the way is visible: the task is marked MISMATCH", async () => {
    evil.mode = { forgeOutput: true };
    const { task, stdout } = await ended("s1", "echo 'rm -rf / happened'");
    expect(stdout).toBe("all good\n");
    expect(task.resultCheck).toBe(ResultCheck.MISMATCH);
  });

  it("a failure turned into a success on the way is visible: MISMATCH; a status stripped of its signature is UNVERIFIED", async () => {
    evil.mode = { forgeExit: true };
    const forged = await ended("s1", "exit 7");
    expect(forged.task.state).toBe(TaskState.SUCCEEDED);
    expect(forged.task.resultCheck).toBe(ResultCheck.MISMATCH);
    evil.mode = { stripSignature: true };
    const stripped = await ended("s2", "exit 0");
    expect(stripped.task.resultCheck).toBe(ResultCheck.UNVERIFIED);
  });

  it("a host's end is MAC'd under a key the proxy never holds: it checks out as relayed, and a proxy that alters its exit code is not believed (MISMATCH)", async () => {
    // The daemons took the controller's X25519 key with its signing key (through this very proxy, which cannot swap it).
    expect(evil.keys.some((k) => k.x25519PublicKey.length === 32)).toBe(true);
    evil.mode = {};
    const honest = await ended("s2", "exit 5");
    const sent = evil.seen.find((x) => x.status.taskId === honest.task.id && x.status.state === TaskState.FAILED)!.status;
    expect(sent.endMac.length).toBe(32);
    expect(sent.signature.length).toBe(0);
    expect(honest.task.exitCode).toBe(5);
    expect(honest.task.resultCheck).toBe(ResultCheck.VERIFIED);
    evil.mode = { zeroExit: true };
    const forged = await ended("s2", "exit 5");
    expect(evil.seen.find((x) => x.status.taskId === forged.task.id && x.status.state === TaskState.FAILED)!.status.endMac.length).toBe(32);
    expect(forged.task.exitCode).toBe(0);
    expect(forged.task.resultCheck).toBe(ResultCheck.MISMATCH);
  });

  /** `rexmesh shell s1 -T -- ARGV` with `input` on a pipe. */
  const shell = (argv: string[], input: string) => rexmesh(["shell", "s1", "-T", "--", ...argv], mesh.exports(), input);
  const secret = "hunter2-the-sudo-password";

  it("a session through the proxy reaches the host intact, and the proxy relays nothing of it it can read", async () => {
    evil.sessionMode = {};
    evil.sessionBytes.length = 0;
    const r = await shell(["sh", "-c", 'cat > "$MARK/typed"; echo "printed $(cat "$MARK/typed")"; exit 4'], `${secret}\n`);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe(`printed ${secret}\n`);
    expect(r.code).toBe(4);
    expect(readFileSync(join(marks(), "typed"), "utf8")).toBe(`${secret}\n`);
    const relayed = Buffer.concat(evil.sessionBytes);
    expect(relayed.length).toBeGreaterThan(secret.length);
    expect(relayed.includes(Buffer.from(secret))).toBe(false);
    expect(relayed.includes(Buffer.from("printed"))).toBe(false);
  });

  it("input altered on the way ends the session DATA_LOSS and never reaches the process", async () => {
    evil.sessionMode = { flip: true };
    const r = await shell(["sh", "-c", 'cat > "$MARK/flipped"'], `${secret}\n`);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/DataLoss: session on s1 ended: a sealed input record of the session did not open: it was altered, moved or left out on the way/);
    expect(existsSync(join(marks(), "flipped")) ? readFileSync(join(marks(), "flipped"), "utf8") : "").toBe("");
  });

  it("a proxy that keeps the host's leg and never joins the controller gets no process on the host", async () => {
    evil.sessionMode = { hold: true };
    const legs = evil.sessionLegs.length;
    const run = shell(["sh", "-c", 'touch "$MARK/held-started"; sleep 30'], "");
    for (let i = 0; i < 200 && evil.sessionLegs.length === legs; i++) await new Promise((res) => setTimeout(res, 50));
    expect(evil.sessionLegs.length).toBe(legs + 1);
    // Before, the daemon started the process as soon as its leg was up; now it waits for the controller's sealed start.
    await new Promise((res) => setTimeout(res, 2000));
    expect(existsSync(join(marks(), "held-started"))).toBe(false);
    const r = await run;
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/did not join the session within 20 s/);
    expect(existsSync(join(marks(), "held-started"))).toBe(false);
  }, 40_000);
});
