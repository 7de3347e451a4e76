import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { ConfigError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { parseWatchers, runCommand, Watchers, type WatcherSpec } from "../../daemon/watchers.js";
import { execFileSync } from "node:child_process";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function harness(specs: WatcherSpec[], exits: number[] = []) {
  const reported: { watcher: string; kind: string; details: Record<string, string> }[] = [];
  const ran: string[][] = [];
  const w = new Watchers({
    specs,
    clock: new ManualClock(),
    log: silentLogger,
    report: async (watcher, kind, details) => void reported.push({ watcher, kind, details }),
    run: async (argv) => {
      ran.push([...argv]);
      return exits.shift() ?? 0;
    },
  });
  return { w, reported, ran };
}

describe("daemon watchers", () => {
  it("a command watcher reports when the exit code changes between runs, not on its first run", async () => {
    const spec: WatcherSpec = { name: "probe", kind: "command", everyMs: 1000, command: ["test", "-f", "/x"], event: "probe.changed" };
    const { w, reported } = harness([spec], [1, 1, 0, 0, 2]);
    for (let i = 0; i < 5; i++) await w.poll(spec);
    expect(reported).toEqual([
      { watcher: "probe", kind: "probe.changed", details: { command: "test -f /x", exit: "0", previous: "1" } },
      { watcher: "probe", kind: "probe.changed", details: { command: "test -f /x", exit: "2", previous: "0" } },
    ]);
  });

  it("a service watcher reports service.failed when the unit leaves active (also when found failed), and service.recovered", async () => {
    const spec: WatcherSpec = { name: "web", kind: "service", everyMs: 1000, unit: "nginx.service" };
    const { w, reported, ran } = harness([spec], [0, 3, 3, 0, 3]);
    for (let i = 0; i < 5; i++) await w.poll(spec);
    expect(ran[0]).toEqual(["systemctl", "is-active", "--quiet", "nginx.service"]);
    expect(reported.map((r) => r.kind)).toEqual(["service.failed", "service.recovered", "service.failed"]);
    expect(reported[0]!.details).toEqual({ unit: "nginx.service", exit: "3" });
    const down = harness([spec], [3]);
    await down.w.poll(spec);
    expect(down.reported.map((r) => r.kind)).toEqual(["service.failed"]);
  });

  it("a file watcher reports a change of content, and the file's removal", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-watch-"));
    dirs.push(dir);
    const path = join(dir, "conf");
    writeFileSync(path, "a");
    const spec: WatcherSpec = { name: "conf", kind: "file", everyMs: 1000, path };
    const { w, reported } = harness([spec]);
    await w.poll(spec);
    await w.poll(spec);
    expect(reported).toEqual([]);
    writeFileSync(path, "b");
    await w.poll(spec);
    expect(reported).toHaveLength(1);
    expect(reported[0]).toMatchObject({ kind: "file.changed", details: { path, exists: "true", size: "1", sha256: "3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d" } });
    rmSync(path);
    await w.poll(spec);
    expect(reported[1]).toMatchObject({ kind: "file.changed", details: { path, exists: "false" } });
  });

  it("a disk watcher reports disk.full once when usage passes the threshold", async () => {
    const spec: WatcherSpec = { name: "root", kind: "disk", everyMs: 1000, path: "/", above: 0.0001 };
    const { w, reported } = harness([spec]);
    await w.poll(spec);
    await w.poll(spec);
    expect(reported).toHaveLength(1);
    expect(reported[0]).toMatchObject({ kind: "disk.full", details: { path: "/", threshold: "0.0001" } });
    const never = harness([{ ...spec, above: 100 }]);
    await never.w.poll({ ...spec, above: 100 });
    expect(never.reported).toEqual([]);
  });

  it("polls on the clock, one poll at a time, and stops", async () => {
    const spec: WatcherSpec = { name: "p", kind: "command", everyMs: 5000, command: ["true"] };
    const clock = new ManualClock();
    let runs = 0;
    const w = new Watchers({ specs: [spec], clock, log: silentLogger, report: async () => undefined, run: async () => (runs++, 0) });
    w.start();
    clock.advance(0);
    await new Promise((r) => setImmediate(r));
    expect(runs).toBe(1);
    clock.advance(4999);
    await new Promise((r) => setImmediate(r));
    expect(runs).toBe(1);
    clock.advance(1);
    await new Promise((r) => setImmediate(r));
    expect(runs).toBe(2);
    w.stop();
    clock.advance(60_000);
    await new Promise((r) => setImmediate(r));
    expect(runs).toBe(2);
  });

  it("refuses a watch file that is not bounded or well formed, naming what is wrong", () => {
    const bad = (data: unknown) => {
      try {
        parseWatchers(data, "watch.yaml");
      } catch (err) {
        expect(err).toBeInstanceOf(ConfigError);
        return (err as Error).message;
      }
      throw new Error("accepted");
    };
    expect(parseWatchers({ watchers: [{ name: "web", kind: "service", unit: "nginx.service", every: "10s" }] }, "w")).toEqual([{ name: "web", kind: "service", unit: "nginx.service", everyMs: 10_000 }]);
    expect(bad({ watchers: {} })).toMatch(/watchers must be a list/);
    expect(bad({ watchers: [], extra: 1 })).toMatch(/one key, watchers/);
    expect(bad({ watchers: Array.from({ length: 33 }, (_, i) => ({ name: `w${i}`, kind: "command", command: ["true"] })) })).toMatch(/33 watchers; at most 32/);
    expect(bad({ watchers: [{ name: "a", kind: "command", command: ["true"], every: "500ms" }] })).toMatch(/every must be from 1s to 24h/);
    expect(bad({ watchers: [{ name: "a", kind: "cron" }] })).toMatch(/kind must be one of command, service, file, disk/);
    expect(bad({ watchers: [{ name: "a", kind: "command" }] })).toMatch(/needs command/);
    expect(bad({ watchers: [{ name: "a", kind: "command", command: "true" }] })).toMatch(/command must be a list/);
    expect(bad({ watchers: [{ name: "a", kind: "file", path: "relative" }] })).toMatch(/path must be absolute/);
    expect(bad({ watchers: [{ name: "a", kind: "disk", path: "/", above: 120 }] })).toMatch(/above must be a percentage/);
    expect(bad({ watchers: [{ name: "a", kind: "service", unit: "x; rm -rf /" }] })).toMatch(/is not a unit name/);
    expect(bad({ watchers: [{ name: "a b", kind: "command", command: ["true"] }] })).toMatch(/name "a b" is not letters/);
    expect(bad({ watchers: [{ name: "a", kind: "file", path: "/x", unit: "u" }] })).toMatch(/unknown key "unit" for a file watcher/);
    expect(bad({ watchers: [{ name: "a", kind: "command", command: ["true"] }, { name: "a", kind: "command", command: ["true"] }] })).toMatch(/a second watcher named a/);
  });
});

describe("a watcher's command (runCommand)", () => {
  const alive = (marker: string) => execFileSync("ps", ["-eo", "args"], { encoding: "utf8" }).split("\n").some((l) => l.includes(marker) && !l.includes("ps -eo"));

  it("kills the whole process group on its timeout: nothing the check started is left running", async () => {
    const marker = `sleep 7.${process.pid}${Date.now() % 1000}`;
    const started = Date.now();
    expect(await runCommand(["sh", "-c", `${marker} & wait`], 300)).toBe(-1);
    expect(Date.now() - started).toBeLessThan(5000);
    await new Promise((r) => setTimeout(r, 200));
    expect(alive(marker)).toBe(false);
  });

  it("reports the exit code however much the command prints, and ends what it left in the background", async () => {
    expect(await runCommand(["sh", "-c", "head -c 1000000 /dev/zero; exit 3"], 10_000)).toBe(3);
    expect(await runCommand(["sh", "-c", "head -c 1000000 /dev/zero"], 10_000)).toBe(0);
    const marker = `sleep 8.${process.pid}${Date.now() % 1000}`;
    expect(await runCommand(["sh", "-c", `${marker} & exit 0`], 10_000)).toBe(0);
    await new Promise((r) => setTimeout(r, 200));
    expect(alive(marker)).toBe(false);
    expect(await runCommand(["/no/such/program"], 1000)).toBe(-1);
  });
});
