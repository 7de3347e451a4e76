import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { issueKeyAndCertificate } from "../../certs/ca.js";
import { credentialPaths, readCredentials, writeCredentials, type Credentials } from "../../certs/files.js";
import type { PeerIdentity } from "../../certs/identity.js";
import { systemClock } from "../../common/clock.js";
import { resolveConfig } from "../../common/config.js";
import { clientFor, openChannel, type Channel } from "../../common/connect-dial.js";
import type { Service } from "../../common/lifecycle.js";
import { silentLogger } from "../../common/logger.js";
import { pathOf } from "../../common/rpc-access.js";
import { CONTROLLER_DECLARATIONS } from "../../controller/declarations.js";
import { controllerSchema, startController } from "../../controller/main.js";
import { AuditDecision, ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { testCa } from "../test-ca.js";
import { tempDir } from "./support.js";

/**
 * The controller's whole authorization surface, over mutual TLS: every
 * method it serves is declared, and every method that is not open refuses
 * an operator with no role and a certificate of the wrong role, each
 * refusal audited.
 */
describe("every served method is declared and guarded", () => {
  const dir = tempDir("declarations");
  const ca = testCa();
  const issue = (identity: PeerIdentity, serves = false): Credentials => {
    const creds = issueKeyAndCertificate(ca, { clock: systemClock, identity, validityMs: 3_600_000, ...(serves ? { dnsNames: ["localhost"], ipAddresses: ["127.0.0.1"] } : {}) });
    writeCredentials(join(dir, "ids"), identity.id, creds);
    return readCredentials(credentialPaths(join(dir, "ids"), identity.id));
  };
  let controller: Service & { address: { port: number }; served: readonly DescMethod[] };
  const channels: Channel[] = [];
  const channelAs = (creds: Credentials) => {
    const c = openChannel(`127.0.0.1:${controller.address.port}`, creds, ["controller"]);
    channels.push(c);
    return c;
  };

  beforeAll(async () => {
    issue({ role: "controller", scope: "mesh", id: "controller" }, true);
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, "roles:\n  admin: { hosts: all, actions: ['*'] }\nbindings:\n  acme/admin: admin\n");
    const paths = credentialPaths(join(dir, "ids"), "controller");
    const config = resolveConfig(controllerSchema, { flags: { listen: "127.0.0.1:0", cert: paths.cert, key: paths.key, ca: paths.ca, data: join(dir, "data"), policy, logLevel: "error" } });
    controller = await startController(config, silentLogger);
  });
  afterAll(async () => {
    for (const c of channels) c.close();
    await controller?.stop(1000);
  });

  it("serves exactly the declared methods", () => {
    expect(new Set(controller.served.map(pathOf))).toEqual(new Set(CONTROLLER_DECLARATIONS.methods().map((m) => pathOf(m.method))));
  });

  /** Calls a method with an empty request; the code it ends with (OK when it succeeds). */
  async function call(channel: Channel, service: DescService, method: DescMethod): Promise<{ code: Code; message: string }> {
    const client = createClient(service, channel.transport) as unknown as Record<string, (req: unknown, opts?: unknown) => unknown>;
    const fn = client[method.localName]!;
    const none = (async function* () {})();
    try {
      switch (method.methodKind) {
        case "unary":
          await fn({});
          break;
        case "client_streaming":
          await fn(none);
          break;
        case "server_streaming":
        case "bidi_streaming":
          for await (const _ of fn(method.methodKind === "server_streaming" ? {} : none, { timeoutMs: 5000 }) as AsyncIterable<unknown>) break;
          break;
      }
      return { code: 0 as Code, message: "" };
    } catch (err) {
      const e = ConnectError.from(err);
      return { code: e.code, message: e.rawMessage };
    }
  }

  it("refuses an operator with no role every method that is not open, and audits each refusal", async () => {
    const nobody = channelAs(issue({ role: "operator", scope: "acme", id: "nobody" }));
    const guarded = CONTROLLER_DECLARATIONS.methods().filter((m) => !("open" in m.declaration));
    for (const m of guarded) {
      const r = await call(nobody, m.service, m.method);
      expect(r.code, pathOf(m.method)).toBe(Code.PermissionDenied);
    }
    const admin = clientFor(ControllerService, channelAs(issue({ role: "operator", scope: "acme", id: "admin" })));
    const { events } = await admin.listAudit({ limit: 1000 });
    const refused = events.filter((e) => e.actor === "operator:acme/nobody" && e.decision === AuditDecision.DENIED);
    expect(refused).toHaveLength(guarded.length);
  });

  it("refuses a host certificate every method that is not open or a host's", async () => {
    const host = channelAs(issue({ role: "host", scope: "acme", id: "h1" }));
    for (const m of CONTROLLER_DECLARATIONS.methods()) {
      if ("open" in m.declaration) continue;
      const r = await call(host, m.service, m.method);
      expect(r.code, pathOf(m.method)).toBe(Code.PermissionDenied);
      expect(r.message, pathOf(m.method)).toMatch(/a host certificate cannot be used here/);
    }
  });

  it("answers open methods to anyone with a certificate", async () => {
    const host = channelAs(issue({ role: "host", scope: "acme", id: "h2" }));
    for (const m of CONTROLLER_DECLARATIONS.methods()) {
      if (!("open" in m.declaration) || m.method.methodKind !== "unary") continue;
      expect((await call(host, m.service, m.method)).code, pathOf(m.method)).toBe(0);
    }
  });
});
