import { execFile } from "node:child_process";
import http2 from "node:http2";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { generateKeyPair, issueCertificate, issueKeyAndCertificate } from "../../certs/ca.js";
import { credentialPaths, readCredentials, writeCredentials, type CredentialPaths } from "../../certs/files.js";
import type { PeerIdentity } from "../../certs/identity.js";
import { systemClock } from "../../common/clock.js";
import { AsyncQueue } from "../../common/async-queue.js";
import { clientFor, openChannel } from "../../common/connect-dial.js";
import { LocalMesh } from "../../cli/launcher.js";
import { AgentLinkService, AgentStreamRequestSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import {
  ControllerService,
  ListHostsRequestSchema,
  ListHostsResponseSchema,
  SubmitJobRequestSchema,
  SubmitJobResponseSchema,
  WatchJobRequestSchema,
  WatchJobResponseSchema,
} from "../../gen/rexmesh/v1/controller_pb.js";
import { ProxyLinkService, ProxyStreamRequestSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { otherTestCa } from "../test-ca.js";
import { tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

const run = promisify(execFile);

/**
 * Every server requires a client certificate from the mesh CA, and each
 * service accepts only the roles it is for. The public API speaks gRPC to
 * any gRPC client and Connect/JSON to curl.
 */
describe("authentication and the public API", () => {
  const dir = tempDir("auth");
  const dir_ = () => dir;
  const mesh = new LocalMesh({ ca: testCa(), dir, regions: ["east"], hosts: [{ id: "h1", region: "east" }] });
  let hostCreds: CredentialPaths;
  let proxyCreds: CredentialPaths;
  let foreignOperator: CredentialPaths;

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
    hostCreds = credentialPaths(join(dir, "hosts", "east-1"), "h1");
    proxyCreds = credentialPaths(join(dir, "identities"), "proxy-east");
    // An operator certificate from another CA: well formed, wrong issuer.
    const otherCa = otherTestCa();
    const identity: PeerIdentity = { role: "operator", scope: "default", id: "mallory" };
    writeCredentials(join(dir, "foreign"), "mallory", issueKeyAndCertificate(otherCa, { clock: systemClock, identity, validityMs: 3_600_000 }));
    // Trusts the real CA (so the server is verified) but presents the foreign certificate.
    foreignOperator = { ...credentialPaths(join(dir, "foreign"), "mallory"), ca: mesh.operator.ca };
  });

  afterAll(() => mesh.stop());

  const controllerWith = (paths: CredentialPaths) => {
    const channel = openChannel(mesh.controllerAddress, readCredentials(paths), ["controller"]);
    return { client: clientFor(ControllerService, channel), close: () => channel.close() };
  };

  async function codeOf(p: Promise<unknown>): Promise<Code> {
    try {
      await p;
    } catch (err) {
      return ConnectError.from(err).code;
    }
    throw new Error("the call succeeded");
  }

  it("refuses a host certificate on the operator API", async () => {
    const { client, close } = controllerWith(hostCreds);
    try {
      const err = await client.listHosts({}).catch((e) => ConnectError.from(e));
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(Code.PermissionDenied);
      expect((err as ConnectError).rawMessage).toMatch(/a host certificate cannot be used here/);
    } finally {
      close();
    }
  });

  it("refuses a proxy certificate on the operator API", async () => {
    const { client, close } = controllerWith(proxyCreds);
    try {
      expect(await codeOf(client.listHosts({}))).toBe(Code.PermissionDenied);
    } finally {
      close();
    }
  });

  it("refuses a host certificate where a proxy is expected (ProxyLink)", async () => {
    const channel = openChannel(mesh.controllerAddress, readCredentials(hostCreds), ["controller"]);
    const client = clientFor(ProxyLinkService, channel);
    const out = new AsyncQueue<ReturnType<typeof create<typeof ProxyStreamRequestSchema>>>();
    out.push(create(ProxyStreamRequestSchema, { hello: { name: "h1", region: "default" } }));
    try {
      const code = await codeOf((async () => { for await (const _ of client.proxyStream(out)) { /* drain */ } })());
      expect(code).toBe(Code.PermissionDenied);
    } finally {
      out.close();
      channel.close();
    }
  });

  it("refuses an operator certificate where a host is expected (AgentLink)", async () => {
    const proxyAddress = mesh.proxies[0]!.address!;
    const channel = openChannel(proxyAddress, readCredentials(mesh.operator), ["proxy"]);
    const client = clientFor(AgentLinkService, channel);
    const out = new AsyncQueue<ReturnType<typeof create<typeof AgentStreamRequestSchema>>>();
    out.push(create(AgentStreamRequestSchema, { hello: { hostId: "dev" }, credits: 1 }));
    try {
      const code = await codeOf((async () => { for await (const _ of client.agentStream(out)) { /* drain */ } })());
      expect(code).toBe(Code.PermissionDenied);
    } finally {
      out.close();
      channel.close();
    }
  });

  it("refuses a host whose hello claims another host's id", async () => {
    const channel = openChannel(mesh.proxies[0]!.address!, readCredentials(hostCreds), ["proxy"]);
    const client = clientFor(AgentLinkService, channel);
    const out = new AsyncQueue<ReturnType<typeof create<typeof AgentStreamRequestSchema>>>();
    out.push(create(AgentStreamRequestSchema, { hello: { hostId: "h2" }, credits: 1 }));
    try {
      const err = await (async () => { for await (const _ of client.agentStream(out)) { /* drain */ } })().catch((e) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.PermissionDenied);
      expect((err as ConnectError).rawMessage).toMatch(/claims host "h2" but the certificate is for host "h1"/);
    } finally {
      out.close();
      channel.close();
    }
  });

  it("refuses a certificate from another CA during the TLS handshake", async () => {
    const { client, close } = controllerWith(foreignOperator);
    try {
      const err = ConnectError.from(await client.listHosts({}).then(() => new Error("succeeded"), (e) => e));
      expect(err.code).not.toBe(Code.PermissionDenied); // never reached a handler
      expect(err.message).toMatch(/unknown ca|certificate|alert|ECONNRESET|socket hang up|closed/i);
    } finally {
      close();
    }
  });

  it("never lets a leaf certificate act as a CA", async () => {
    // A host signs an "operator" certificate with its own key and presents the chain.
    const forge = (await import("node-forge")).default;
    // A host certificate on an RSA key (node-forge, which makes the forgery, handles no other; hosts get ECDSA P-256 keys by default).
    const rsa = generateKeyPair(2048);
    const host = { certPem: issueCertificate(testCa(), { clock: systemClock, identity: { role: "host", scope: "default", id: "h1" }, publicKeyPem: rsa.publicKeyPem, validityMs: 3_600_000 }), keyPem: rsa.privateKeyPem };
    const hostCert = forge.pki.certificateFromPem(host.certPem);
    const keys = forge.pki.rsa.generateKeyPair(1024);
    const forged = forge.pki.createCertificate();
    forged.publicKey = keys.publicKey;
    forged.serialNumber = "01";
    forged.validity.notBefore = new Date(Date.now() - 60_000);
    forged.validity.notAfter = new Date(Date.now() + 3_600_000);
    forged.setSubject([{ name: "commonName", value: "mallory" }]);
    forged.setIssuer(hostCert.subject.attributes);
    forged.setExtensions([{ name: "subjectAltName", altNames: [{ type: 6, value: "rexmesh://operator/default/mallory" }] }]);
    forged.sign(forge.pki.privateKeyFromPem(host.keyPem), forge.md.sha256.create());
    const dir = join(dir_(), "forged");
    const { mkdirSync, writeFileSync } = await import("node:fs");
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "m.crt"), forge.pki.certificateToPem(forged) + host.certPem);
    writeFileSync(join(dir, "m.key"), forge.pki.privateKeyToPem(keys.privateKey));
    const { client, close } = controllerWith({ cert: join(dir, "m.crt"), key: join(dir, "m.key"), ca: mesh.operator.ca });
    try {
      const err = ConnectError.from(await client.listHosts({}).then(() => new Error("succeeded"), (e) => e));
      expect(err.code).not.toBe(Code.PermissionDenied); // refused by TLS, before any handler
      expect(err.message).not.toMatch(/succeeded/);
    } finally {
      close();
    }
  });

  it("refuses plain HTTP", async () => {
    for (const args of [["--http1.1"], ["--http2-prior-knowledge"]]) {
      const r = await run("curl", ["-sS", ...args, "-H", "Content-Type: application/json", "-d", "{}", `http://${mesh.controllerAddress}/rexmesh.v1.ControllerService/ListHosts`]).then(
        ({ stdout }) => ({ code: 0, stdout }),
        (e: { code: number; stdout: string }) => e,
      );
      expect(r.code, args.join(" ")).not.toBe(0);
      expect(r.stdout).not.toMatch(/hosts/);
    }
  });

  it("refuses TLS without a client certificate", async () => {
    const ca = readCredentials(mesh.operator).caPem;
    const session = http2.connect(`https://${mesh.controllerAddress}`, { ca });
    const outcome = await new Promise<string>((resolve) => {
      session.on("error", (e) => resolve(`error: ${e.message}`));
      const req = session.request({ ":method": "POST", ":path": "/rexmesh.v1.ControllerService/ListHosts", "content-type": "application/json" });
      req.on("response", (h) => resolve(`response ${h[":status"]}`));
      req.on("error", (e) => resolve(`error: ${e.message}`));
      req.end("{}");
    });
    session.destroy();
    expect(outcome).toMatch(/^error: .*(certificate required|alert|ECONNRESET|closed|socket)/i);
  });

  it("refuses curl without a client certificate", async () => {
    // The handshake is refused; how curl words it depends on timing (alert, reset, not connected).
    const r = await run("curl", ["-sS", "--cacert", mesh.operator.ca, "-H", "Content-Type: application/json", "-d", "{}", `https://${mesh.controllerAddress}/rexmesh.v1.ControllerService/ListHosts`]).then(
      ({ stdout }) => ({ code: 0, stdout, stderr: "" }),
      (e: { code: number; stdout: string; stderr: string }) => e,
    );
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/curl: \((35|16|55|56|92)\)/);
  });

  it("answers a plain @grpc/grpc-js client: unary and server streaming", async () => {
    const files = readCredentials(mesh.operator);
    const creds = grpc.credentials.createSsl(Buffer.from(files.caPem), Buffer.from(files.keyPem), Buffer.from(files.certPem));
    const client = new grpc.Client(mesh.controllerAddress, creds);
    try {
      const unary = <Req, Res>(method: string, req: Req, ser: (r: Req) => Uint8Array, de: (b: Uint8Array) => Res) =>
        new Promise<Res>((resolve, reject) =>
          client.makeUnaryRequest(`/rexmesh.v1.ControllerService/${method}`, (r: Req) => Buffer.from(ser(r)), (b: Buffer) => de(b), req, (err, res) => (err ? reject(err) : resolve(res!))),
        );
      const hosts = await unary("ListHosts", create(ListHostsRequestSchema), (r) => toBinary(ListHostsRequestSchema, r), (b) => fromBinary(ListHostsResponseSchema, b));
      expect(hosts.hosts.map((h) => h.id)).toEqual(["h1"]);
      const submitted = await unary(
        "SubmitJob",
        create(SubmitJobRequestSchema, { hostIds: ["h1"], steps: [{ tool: { case: "exec", value: { argv: ["echo", "via grpc-js"] } } }] }),
        (r) => toBinary(SubmitJobRequestSchema, r),
        (b) => fromBinary(SubmitJobResponseSchema, b),
      );
      const stream = client.makeServerStreamRequest(
        "/rexmesh.v1.ControllerService/WatchJob",
        (r: ReturnType<typeof create<typeof WatchJobRequestSchema>>) => Buffer.from(toBinary(WatchJobRequestSchema, r)),
        (b: Buffer) => fromBinary(WatchJobResponseSchema, b),
        create(WatchJobRequestSchema, { jobId: submitted.job!.id }),
      );
      let text = "";
      let final: TaskState | undefined;
      for await (const batch of stream as AsyncIterable<ReturnType<typeof fromBinary<typeof WatchJobResponseSchema>>>) {
        for (const c of batch.output) text += Buffer.from(c.data).toString();
        for (const t of batch.tasks) final = t.state;
      }
      expect(text).toBe("via grpc-js\n");
      expect(final).toBe(TaskState.SUCCEEDED);
    } finally {
      client.close();
    }
  });

  it("answers a gRPC-Web client", async () => {
    const { createGrpcWebTransport } = await import("@connectrpc/connect-node");
    const { createClient } = await import("@connectrpc/connect");
    const { clientTlsOptions } = await import("../../certs/tls.js");
    const transport = createGrpcWebTransport({
      baseUrl: `https://${mesh.controllerAddress}`,
      httpVersion: "1.1",
      nodeOptions: clientTlsOptions(readCredentials(mesh.operator), ["controller"]),
    });
    const { hosts } = await createClient(ControllerService, transport).listHosts({});
    expect(hosts.map((h) => h.id)).toEqual(["h1"]);
  });

  it("answers a Connect/JSON POST from curl", async () => {
    const base = `https://${mesh.controllerAddress}/rexmesh.v1.ControllerService`;
    const curl = async (method: string, body: string) => {
      const { stdout } = await run("curl", [
        "-sS", "--fail-with-body",
        "--cert", mesh.operator.cert, "--key", mesh.operator.key, "--cacert", mesh.operator.ca,
        "-H", "Content-Type: application/json",
        "-d", body,
        `${base}/${method}`,
      ]);
      return JSON.parse(stdout);
    };
    const hosts = await curl("ListHosts", "{}");
    expect(hosts.hosts.map((h: { id: string }) => h.id)).toEqual(["h1"]);
    expect(hosts.hosts[0].connection).toBe("CONNECTION_STATE_CONNECTED");
    const submitted = await curl("SubmitJob", JSON.stringify({ hostIds: ["h1"], steps: [{ exec: { argv: ["echo", "via curl"] } }] }));
    expect(submitted.job.id).toMatch(/^j/);
    expect(submitted.job.taskCount).toBe(1);
    // Unknown job: a Connect error with the right code, as JSON.
    const notFound = await run("curl", ["-sS", "--cert", mesh.operator.cert, "--key", mesh.operator.key, "--cacert", mesh.operator.ca, "-H", "Content-Type: application/json", "-d", '{"jobId":"nope"}', `${base}/GetJob`]);
    expect(JSON.parse(notFound.stdout)).toMatchObject({ code: "not_found" });
    // A misspelt field is refused by name, not dropped: `hostIDs` would otherwise submit a job with no target.
    const misspelt = await run("curl", ["-sS", "--cert", mesh.operator.cert, "--key", mesh.operator.key, "--cacert", mesh.operator.ca, "-H", "Content-Type: application/json", "-d", '{"hostIDs":["h1"],"steps":[{"exec":{"argv":["true"]}}]}', `${base}/SubmitJob`]);
    const refused = JSON.parse(misspelt.stdout) as { code: string; message: string };
    expect(refused.code).toBe("invalid_argument");
    expect(refused.message).toMatch(/hostIDs/);
  });
});
