import { describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { PermissionDeniedError } from "../../common/errors.js";
import { MAX_ERROR_MESSAGE_CHARS, toConnectError, toGrpcStatus } from "../../common/rpc-errors.js";

describe("toConnectError", () => {
  it("cuts a message that echoes a huge input, keeping its code, so the trailer it travels in stays sendable", () => {
    const name = "x".repeat(2 * 1024 * 1024);
    for (const err of [new PermissionDeniedError(`the stream claims proxy ${name}`), new ConnectError(`no ${name}`, Code.InvalidArgument)]) {
      const c = toConnectError(err);
      expect(c.rawMessage.length).toBeLessThanOrEqual(MAX_ERROR_MESSAGE_CHARS + 10);
      expect(c.rawMessage.endsWith("… (cut)")).toBe(true);
      expect(c.code).toBe(err instanceof ConnectError ? Code.InvalidArgument : Code.PermissionDenied);
      expect(toGrpcStatus(err).details.length).toBeLessThanOrEqual(MAX_ERROR_MESSAGE_CHARS + 10);
    }
    // A message within the bound is passed as it is (the same ConnectError).
    const small = new ConnectError("short", Code.NotFound);
    expect(toConnectError(small)).toBe(small);
    expect(toConnectError(new PermissionDeniedError("short")).rawMessage).toBe("short");
  });
});
