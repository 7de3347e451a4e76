import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { readCredentials, type CredentialPaths } from "../../certs/files.js";
import { LocalMesh } from "../../cli/launcher.js";
import { HealthCheckRequestSchema, HealthCheckResponse_ServingStatus as Status, HealthCheckResponseSchema, type HealthCheckResponse } from "../../gen/grpc/health/v1/health_pb.js";
import { tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/** A plain grpc-js client of grpc.health.v1, as a load balancer or grpc-health-probe would use it. */
function healthClient(address: string, paths: CredentialPaths) {
  const c = readCredentials(paths);
  const client = new grpc.Client(address, grpc.credentials.createSsl(Buffer.from(c.caPem), Buffer.from(c.keyPem), Buffer.from(c.certPem)));
  const ser = (m: ReturnType<typeof create<typeof HealthCheckRequestSchema>>) => Buffer.from(toBinary(HealthCheckRequestSchema, m));
  const de = (b: Buffer) => fromBinary(HealthCheckResponseSchema, b);
  return {
    check: (service = "") =>
      new Promise<Status>((resolve, reject) =>
        client.makeUnaryRequest("/grpc.health.v1.Health/Check", ser, de, create(HealthCheckRequestSchema, { service }), (err, res) => (err ? reject(err) : resolve(res!.status))),
      ),
    watch: (service = "") => client.makeServerStreamRequest("/grpc.health.v1.Health/Watch", ser, de, create(HealthCheckRequestSchema, { service })),
    close: () => client.close(),
  };
}

describe("health checking (grpc.health.v1)", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("health"), regions: ["r"], hosts: [{ id: "h1", region: "r" }], controllerArgs: ["--grace", "5s"] });
  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
  });
  afterAll(() => mesh.stop());

  it("reports SERVING on the controller and the proxy, per service and for the whole process", async () => {
    const ctl = healthClient(mesh.controllerAddress, mesh.operator);
    const px = healthClient(mesh.proxies[0]!.address!, mesh.operator);
    try {
      expect(await ctl.check()).toBe(Status.SERVING);
      expect(await ctl.check("rexmesh.v1.ControllerService")).toBe(Status.SERVING);
      expect(await ctl.check("no.such.Service")).toBe(Status.SERVICE_UNKNOWN);
      expect(await px.check()).toBe(Status.SERVING);
      expect(await px.check("rexmesh.v1.AgentLinkService")).toBe(Status.SERVING);
    } finally {
      ctl.close();
      px.close();
    }
  });

  it("answers gRPC server reflection: the services, and each one's .proto with its imports", async () => {
    const { ServerReflectionRequestSchema, ServerReflectionResponseSchema } = await import("../../gen/grpc/reflection/v1/reflection_pb.js");
    const { FileDescriptorProtoSchema } = await import("@bufbuild/protobuf/wkt");
    const c = readCredentials(mesh.operator);
    const client = new grpc.Client(mesh.controllerAddress, grpc.credentials.createSsl(Buffer.from(c.caPem), Buffer.from(c.keyPem), Buffer.from(c.certPem)));
    try {
      const call = client.makeBidiStreamRequest(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        (m: ReturnType<typeof create<typeof ServerReflectionRequestSchema>>) => Buffer.from(toBinary(ServerReflectionRequestSchema, m)),
        (b: Buffer) => fromBinary(ServerReflectionResponseSchema, b),
      );
      const replies: ReturnType<typeof fromBinary<typeof ServerReflectionResponseSchema>>[] = [];
      const done = new Promise<void>((resolve, reject) => {
        call.on("data", (r) => {
          replies.push(r);
          if (replies.length === 2) resolve();
        });
        call.on("error", reject);
      });
      call.write(create(ServerReflectionRequestSchema, { messageRequest: { case: "listServices", value: "" } }));
      call.write(create(ServerReflectionRequestSchema, { messageRequest: { case: "fileContainingSymbol", value: "rexmesh.v1.ControllerService.SubmitJob" } }));
      await done;
      call.end();
      const list = replies[0]!.messageResponse;
      expect(list.case === "listServicesResponse" && list.value.service.map((s) => s.name)).toEqual(expect.arrayContaining(["rexmesh.v1.ControllerService", "grpc.health.v1.Health"]));
      const files = replies[1]!.messageResponse;
      expect(files.case).toBe("fileDescriptorResponse");
      const names = files.case === "fileDescriptorResponse" ? files.value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b).name) : [];
      expect(names[0]).toBe("rexmesh/v1/controller.proto");
      expect(names).toEqual(expect.arrayContaining(["rexmesh/v1/task.proto", "google/protobuf/timestamp.proto"]));
    } finally {
      client.close();
    }
  });

  it("turns NOT_SERVING as soon as the controller starts draining", async () => {
    const ctl = healthClient(mesh.controllerAddress, mesh.operator);
    try {
      const stream = ctl.watch();
      const seen: Status[] = [];
      const notServing = new Promise<void>((resolve, reject) => {
        stream.on("data", (m: HealthCheckResponse) => {
          seen.push(m.status);
          if (m.status === Status.SERVING) mesh.controller.proc.kill("SIGTERM");
          if (m.status === Status.NOT_SERVING) resolve();
        });
        stream.on("error", reject);
      });
      await notServing;
      expect(seen).toEqual([Status.SERVING, Status.NOT_SERVING]);
      stream.cancel();
    } finally {
      ctl.close();
    }
    await mesh.exited(mesh.controller);
    expect(mesh.controller.proc.exitCode).toBe(0);
  });
});
