import { getEventListeners } from "node:events";
import { createServer } from "node:net";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { requestEnrollment } from "../../daemon/enroll.js";
import { EnrollRequestSchema } from "../../gen/rexmesh/v1/enroll_pb.js";
import { testSigning } from "./support.js";

describe("enrollment calls", () => {
  it("leave no abort listener on the process-wide signal they share (renewals of many hosts in one daemon)", async () => {
    // A listener that accepts and says nothing: every call ends by its deadline.
    const silent = createServer((s) => s.on("error", () => undefined));
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    const port = (silent.address() as { port: number }).port;
    const shared = new AbortController();
    try {
      const calls = Array.from({ length: 12 }, () =>
        requestEnrollment(`127.0.0.1:${port}`, testSigning().caPem, create(EnrollRequestSchema, {}), undefined, shared.signal, 300).then(
          () => "answered",
          () => "failed",
        ),
      );
      expect(await Promise.all(calls)).toEqual(Array(12).fill("failed"));
      expect(getEventListeners(shared.signal, "abort")).toHaveLength(0);
    } finally {
      silent.close();
    }
  });
});
