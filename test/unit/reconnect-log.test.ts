import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { createLogger } from "../../common/logger.js";
import { reconnectLoop } from "../../common/reconnect.js";
import { flush } from "./support.js";

/** What an operator reads: one line per log record, "level message". */
function capture() {
  const lines: string[] = [];
  const log = createLogger({ level: "debug", write: (line: string) => lines.push(line) });
  const said = () => lines.map((l) => JSON.parse(l) as { level: string; msg: string }).map((r) => `${r.level} ${r.msg}`);
  return { log, said };
}

describe("the reconnect loop's log", () => {
  it("says when a peer cannot be reached (warn once, then debug), and never 'up' before the peer answered", async () => {
    const clock = new ManualClock();
    const { log, said } = capture();
    const stop = new AbortController();
    let answered = false;
    let closeServing = () => undefined as void;
    const loop = reconnectLoop<object>({
      targets: ["127.0.0.1:1", "127.0.0.1:2"],
      dial: () => Promise.resolve({}),
      // The peer never answers until `answered`: the stream ends (refused, reset) before its welcome.
      serve: (_link, _target, up) => {
        if (answered) up("px1");
        return answered ? new Promise<void>((resolve) => (closeServing = resolve)) : Promise.reject(new Error("connect ECONNREFUSED"));
      },
      close: () => closeServing(),
      clock,
      log,
      signal: stop.signal,
      what: "proxy link",
      random: () => 0.5,
    });
    for (let i = 0; i < 3; i++) {
      await flush();
      clock.advance(60_000);
    }
    await flush();
    const before = said();
    expect(before[0]).toBe("warn cannot reach proxy");
    expect(before.slice(1).every((l) => l === "debug cannot reach proxy")).toBe(true);
    expect(before.length).toBeGreaterThanOrEqual(3);
    expect(before.some((l) => l.includes(" up"))).toBe(false);
    answered = true;
    clock.advance(60_000);
    await flush();
    expect(said().at(-1)).toBe("info proxy link up");
    stop.abort();
    await loop;
  });
});
