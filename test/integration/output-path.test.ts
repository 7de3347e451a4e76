/**
 * The output path end to end, real processes (daemon → proxy → controller →
 * client over mTLS, LMDB at every hop): output gathered into large chunks
 * reaches the client byte-identical per stream, and a client that stops
 * reading costs no hop memory in proportion to the output (the controller's
 * store is the buffer; back-pressure holds the rest at the producer), and
 * once it reads again every byte arrives.
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { LocalMesh } from "../../cli/launcher.js";
import { isTerminal } from "../../common/task-state.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

const MiB = 1024 * 1024;

/**
 * A known pseudo-random byte stream (xorshift32 words): the producer and the
 * test both make it from the seed. Its source is put into the producer's
 * program as it is.
 */
function stream(seed: number, bytes: number): Buffer {
  const words = new Uint32Array(Math.ceil(bytes / 4));
  let x = seed >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  return Buffer.from(words.buffer, 0, bytes);
}

/** Invalid UTF-8 and every byte value, at the head of each stream. */
const HEAD = Buffer.concat([Buffer.from([0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1, 0xf0, 0x90, 0x28, 0xbc, 0xff, 0xfe, 0x00, 0xed, 0xa0, 0x80]), Buffer.from(Array.from({ length: 256 }, (_, i) => i))]);

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/**
 * A node program that writes HEAD then stream(seed) of `bytes` to stdout and
 * HEAD then stream(seed + 1) of `errBytes` to stderr, interleaved, in writes
 * of irregular sizes (1 byte to 200 KiB) with now and then a pause of a few
 * ms, every write waited for.
 */
function producer(bytes: number, errBytes: number, seed: number, irregular: boolean): string {
  return `
    ${stream.toString()}
    const head = Buffer.from(${JSON.stringify([...HEAD])});
    const out = Buffer.concat([head, stream(${seed}, ${bytes})]);
    const err = Buffer.concat([head, stream(${seed + 1}, ${errBytes})]);
    let r = ${seed} >>> 0;
    const rand = (n) => { r ^= r << 13; r >>>= 0; r ^= r >>> 17; r ^= r << 5; r >>>= 0; return r % n; };
    const write = (s, b) => new Promise((res) => (s.write(b) ? res() : s.once("drain", res)));
    (async () => {
      let o = 0, e = 0;
      while (o < out.length || e < err.length) {
        const toErr = e < err.length && (o >= out.length || rand(4) === 0);
        const size = ${irregular} ? 1 + rand(rand(3) === 0 ? 200 * 1024 : 300) : 1 << 20;
        if (toErr) { await write(process.stderr, err.subarray(e, e + size)); e += size; }
        else { await write(process.stdout, out.subarray(o, o + size)); o += size; }
        if (${irregular} && rand(50) === 0) await new Promise((res) => setTimeout(res, 1 + rand(8)));
      }
    })();
  `;
}

/** Anonymous resident memory of a process, from /proc (0 once it is gone). */
function anonBytes(pid: number): number {
  try {
    const m = /RssAnon:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

describe("output path (real processes)", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("output-path"), regions: ["r"], hosts: [{ id: "h1", region: "r" }] });
  let conn: ReturnType<typeof clientOf>;

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
    conn = clientOf(mesh);
  }, 120_000);
  afterAll(async () => {
    conn?.close();
    await mesh.stop();
  });

  it("a producer writing several MB of interleaved stdout/stderr in irregular writes: the client reads identical bytes per stream, in contiguous seqs", async () => {
    const bytes = 5 * MiB + 12_345;
    const errBytes = 2 * MiB + 777;
    const seed = 0x2545f491;
    const { job } = await conn.client.submitJob(
      create(SubmitJobRequestSchema, {
        hostIds: ["h1"],
        steps: [{ tool: { case: "exec", value: { argv: [process.execPath, "-e", producer(bytes, errBytes, seed, true)] } } }],
        outputLimitBytes: BigInt(64 * MiB),
      }),
    );
    const r = await collectJob(conn.client, job!.id, AbortSignal.timeout(90_000));
    const t = r.tasks.get("h1")!;
    expect(t.state, t.message).toBe(TaskState.SUCCEEDED);
    expect(t.outputTruncated).toBe(false);
    const out = r.stdout.get("h1") ?? Buffer.alloc(0);
    const err = r.stderr.get("h1") ?? Buffer.alloc(0);
    expect(out.length).toBe(HEAD.length + bytes);
    expect(err.length).toBe(HEAD.length + errBytes);
    expect(sha256(out)).toBe(sha256(Buffer.concat([HEAD, stream(seed, bytes)])));
    expect(sha256(err)).toBe(sha256(Buffer.concat([HEAD, stream(seed + 1, errBytes)])));
    const seqs = r.seqs.get("h1")!;
    expect(seqs).toEqual(Array.from({ length: seqs.length }, (_, i) => i + 1));
    expect(t.outputComplete).toBe(true);
    // Chunks stay within the bound every hop's frames are sized for.
    expect(Math.max(...r.chunks.get("h1")!.map((c) => c.data.length))).toBeLessThanOrEqual(MiB);
  }, 120_000);

  it("a client that stops reading holds no hop's memory in proportion to the output; when it reads again every byte arrives, identical", async () => {
    const bytes = 160 * MiB;
    const seed = 0x1234567;
    const pids = { controller: mesh.controller.proc.pid!, proxy: mesh.proxies[0]!.proc.pid!, daemon: mesh.daemons[0]!.proc.pid! };
    const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, anonBytes(pid)]));
    const peak: Record<string, number> = { ...before };
    const sampler = setInterval(() => {
      for (const [k, pid] of Object.entries(pids)) peak[k] = Math.max(peak[k]!, anonBytes(pid));
    }, 50);
    try {
      const { job } = await conn.client.submitJob(
        create(SubmitJobRequestSchema, {
          hostIds: ["h1"],
          steps: [{ tool: { case: "exec", value: { argv: [process.execPath, "-e", producer(bytes, 0, seed, false)] } } }],
          outputLimitBytes: BigInt(bytes + MiB),
        }),
      );
      const hash = createHash("sha256");
      let got = 0;
      const watch = conn.client.watchJob({ jobId: job!.id }, { signal: AbortSignal.timeout(240_000) })[Symbol.asyncIterator]();
      // Read until the first output arrives, then stop reading until the task has ended.
      for (;;) {
        const { value, done } = await watch.next();
        if (done) throw new Error("the watch ended before any output");
        const out = value.output.filter((c) => c.stream === OutputStream.STDOUT);
        for (const c of out) {
          hash.update(c.data);
          got += c.data.length;
        }
        if (out.length > 0) break;
      }
      const ended = await until(
        "the task to end while its reader is stalled",
        async () => {
          const { tasks } = await conn.client.getJob({ jobId: job!.id });
          return tasks[0] && isTerminal(tasks[0].state) ? tasks[0] : undefined;
        },
        180_000,
      );
      expect(ended.state, ended.message).toBe(TaskState.SUCCEEDED);
      // Stalled through the whole run: no hop kept the output in memory.
      for (const k of Object.keys(pids)) expect(peak[k]! - before[k]!, `${k} anonymous memory grew by`).toBeLessThan(96 * MiB);
      // Reading again: the rest, identical.
      for (;;) {
        const { value, done } = await watch.next();
        if (done) break;
        for (const c of value.output) {
          if (c.stream !== OutputStream.STDOUT) continue;
          hash.update(c.data);
          got += c.data.length;
        }
      }
      expect(got).toBe(HEAD.length + bytes);
      expect(hash.digest("hex")).toBe(sha256(Buffer.concat([HEAD, stream(seed, bytes)])));
    } finally {
      clearInterval(sampler);
    }
  }, 300_000);
});
