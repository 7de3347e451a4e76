import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";

/** The built logger, as every role process loads it (role processes run from dist/). */
const LOGGER = new URL("../../dist/common/logger.js", import.meta.url).href;

describe("a role's log on stderr", () => {
  it("is one JSON object per line on stderr, at the level asked, with secrets redacted", () => {
    const script = `
      import { createLogger } from ${JSON.stringify(LOGGER)};
      const log = createLogger({ level: "info" }, { role: "controller" });
      log.debug("not written");
      log.info("join token created", { tokenId: "tk1", token: "rxj_Secret_abc", headers: { authorization: "Bearer Secret_def" } });
      process.exit(0);
    `;
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8" });
    expect(r.status).toBe(0);
    expect(r.stdout).toBe("");
    const lines = r.stderr.trim().split("\n");
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!)).toMatchObject({ level: "info", role: "controller", msg: "join token created", tokenId: "tk1", token: "[redacted]", headers: { authorization: "[redacted]" } });
    expect(r.stderr).not.toContain("Secret");
  });
});
