import { create, toBinary, type DescFile, type DescMessage, type DescService } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { ServerReflection, ServerReflectionResponseSchema, type ServerReflectionRequest, type ServerReflectionResponse } from "../gen/grpc/reflection/v1/reflection_pb.js";

/**
 * gRPC server reflection (grpc.reflection.v1) from the generated
 * descriptors: lists the services a server hosts and hands out their
 * .proto files (with every dependency), so grpcurl-style tools need nothing
 * but the address and a certificate.
 */
export function reflectionServiceImpl(services: readonly DescService[]): ServiceImpl<typeof ServerReflection> {
  const files = new Map<string, DescFile>();
  const bySymbol = new Map<string, DescFile>();
  const addMessages = (file: DescFile, messages: readonly DescMessage[]) => {
    for (const m of messages) {
      bySymbol.set(m.typeName, file);
      addMessages(file, m.nestedMessages);
      for (const e of m.nestedEnums) bySymbol.set(e.typeName, file);
    }
  };
  const addFile = (file: DescFile) => {
    if (files.has(file.proto.name)) return;
    files.set(file.proto.name, file);
    for (const s of file.services) {
      bySymbol.set(s.typeName, file);
      for (const m of s.methods) bySymbol.set(`${s.typeName}.${m.name}`, file);
    }
    addMessages(file, file.messages);
    for (const e of file.enums) bySymbol.set(e.typeName, file);
    for (const dep of file.dependencies) addFile(dep);
  };
  for (const s of services) addFile(s.file);

  /** The file and everything it imports, the file first. */
  const withDependencies = (file: DescFile): Uint8Array[] => {
    const seen = new Set<string>();
    const out: Uint8Array[] = [];
    const visit = (f: DescFile) => {
      if (seen.has(f.proto.name)) return;
      seen.add(f.proto.name);
      out.push(toBinary(FileDescriptorProtoSchema, f.proto));
      for (const d of f.dependencies) visit(d);
    };
    visit(file);
    return out;
  };

  const answer = (req: ServerReflectionRequest): ServerReflectionResponse => {
    const base = { validHost: req.host, originalRequest: req };
    const files_ = (file: DescFile | undefined, what: string) =>
      file
        ? create(ServerReflectionResponseSchema, { ...base, messageResponse: { case: "fileDescriptorResponse", value: { fileDescriptorProto: withDependencies(file) } } })
        : create(ServerReflectionResponseSchema, { ...base, messageResponse: { case: "errorResponse", value: { errorCode: 5, errorMessage: `${what} not found` } } });
    switch (req.messageRequest.case) {
      case "listServices":
        return create(ServerReflectionResponseSchema, { ...base, messageResponse: { case: "listServicesResponse", value: { service: services.map((s) => ({ name: s.typeName })) } } });
      case "fileByFilename":
        return files_(files.get(req.messageRequest.value), `file ${req.messageRequest.value}`);
      case "fileContainingSymbol":
        return files_(bySymbol.get(req.messageRequest.value), `symbol ${req.messageRequest.value}`);
      default:
        return create(ServerReflectionResponseSchema, { ...base, messageResponse: { case: "errorResponse", value: { errorCode: 12, errorMessage: "not supported" } } });
    }
  };

  return {
    async *serverReflectionInfo(requests) {
      for await (const req of requests) yield answer(req);
    },
  };
}
