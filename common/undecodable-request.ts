/**
 * connect-es decodes the request of a unary call before any interceptor
 * runs, and answers a request that is not valid protobuf with INTERNAL
 * ("parse binary: ..."): the one error the server's boundary never sees.
 * This wrapper of a unary method's handler finds that answer in the
 * response of each protocol and replaces it with the code chosen for it in
 * common/rpc-errors.ts (INVALID_ARGUMENT), and logs the refusal. Streaming
 * methods read their requests inside the interceptor, which maps them there.
 */
import { ConnectError } from "@connectrpc/connect";
import { createAsyncIterable, encodeEnvelope, type UniversalHandler, type UniversalServerRequest, type UniversalServerResponse } from "@connectrpc/connect/protocol";
import { codeToHttpStatus, errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { trailerFlag, trailerParse, trailerSerialize } from "@connectrpc/connect/protocol-grpc-web";
import { isDecodeFailure, toConnectError } from "./rpc-errors.js";

/** Returns the handler itself for streaming methods; wraps unary ones. */
export function mapUndecodableRequests(handler: UniversalHandler, onRefused: (err: ConnectError, req: UniversalServerRequest) => void): UniversalHandler {
  if (handler.method.methodKind !== "unary") return handler;
  const wrapped = async (req: UniversalServerRequest): Promise<UniversalServerResponse> => {
    const res = await handler(req);
    const refused = (err: ConnectError) => onRefused(err, req);
    const type = req.header.get("content-type") ?? "";
    if (type.startsWith("application/grpc-web")) return grpcWeb(res, refused);
    if (type.startsWith("application/grpc")) return grpc(res, refused);
    if (type.startsWith("application/proto")) return connectUnary(res, refused);
    return res;
  };
  return asHandlerOf(handler, wrapped);
}

/** A function serving in place of a connect-es handler, carrying the handler's routing fields. */
export function asHandlerOf(handler: UniversalHandler, fn: (req: UniversalServerRequest) => ReturnType<UniversalHandler>): UniversalHandler {
  return Object.assign(fn, {
    protocolNames: handler.protocolNames,
    service: handler.service,
    method: handler.method,
    requestPath: handler.requestPath,
    allowedMethods: handler.allowedMethods,
    supportedContentType: handler.supportedContentType,
  });
}

/** The connect-es error a status carries, rebuilt from its wire form. */
function wireError(code: string | number | null | undefined, message: string): ConnectError | undefined {
  const err = new ConnectError(message, Number(code));
  return isDecodeFailure(err) ? err : undefined;
}

/** gRPC: the status is in the trailer, already set when a unary call's handler resolves. */
function grpc(res: UniversalServerResponse, refused: (err: ConnectError) => void): UniversalServerResponse {
  const trailer = res.trailer;
  if (!trailer) return res;
  const err = wireError(trailer.get("grpc-status"), decodeURIComponent(trailer.get("grpc-message") ?? ""));
  if (!err) return res;
  const mapped = toConnectError(err);
  refused(mapped);
  setTrailerStatus(trailer, mapped);
  return res;
}

/** gRPC-Web: the status is the last envelope of the body (one message at most, for a unary call). */
async function grpcWeb(res: UniversalServerResponse, refused: (err: ConnectError) => void): Promise<UniversalServerResponse> {
  if (!res.body) return res;
  const chunks: Uint8Array[] = [];
  for await (const c of res.body) chunks.push(c);
  const body = Buffer.concat(chunks);
  const last = lastEnvelope(body);
  if (last && (last.flags & trailerFlag) === trailerFlag) {
    const trailer = trailerParse(last.data);
    const err = wireError(trailer.get("grpc-status"), decodeURIComponent(trailer.get("grpc-message") ?? ""));
    if (err) {
      const mapped = toConnectError(err);
      refused(mapped);
      const rewritten = encodeEnvelope(trailerFlag, trailerSerialize(setTrailerStatus(new Headers(), mapped)));
      return { ...res, body: createAsyncIterable([body.subarray(0, last.start), rewritten]) };
    }
  }
  return { ...res, body: createAsyncIterable([body]) };
}

function lastEnvelope(body: Buffer): { start: number; flags: number; data: Uint8Array } | undefined {
  let last: { start: number; flags: number; data: Uint8Array } | undefined;
  for (let at = 0; at + 5 <= body.length; ) {
    const length = body.readUInt32BE(at + 1);
    if (at + 5 + length > body.length) return undefined;
    last = { start: at, flags: body[at]!, data: body.subarray(at + 5, at + 5 + length) };
    at += 5 + length;
  }
  return last;
}

/** Connect, unary: an error is an HTTP status and a JSON body. */
async function connectUnary(res: UniversalServerResponse, refused: (err: ConnectError) => void): Promise<UniversalServerResponse> {
  if (res.status !== 500 || !res.body) return res;
  const chunks: Uint8Array[] = [];
  for await (const c of res.body) chunks.push(c);
  const body = Buffer.concat(chunks);
  let json: { code?: string; message?: string } = {};
  try {
    json = JSON.parse(body.toString("utf8")) as typeof json;
  } catch {
    /* not a Connect error body */
  }
  const err = json.code === "internal" ? wireError(13, json.message ?? "") : undefined;
  if (!err) return { ...res, body: createAsyncIterable([body]) };
  const mapped = toConnectError(err);
  refused(mapped);
  const rewritten = errorToJsonBytes(mapped, undefined);
  const header = new Headers(res.header);
  header.set("content-length", String(rewritten.byteLength));
  return { ...res, status: codeToHttpStatus(mapped.code), header, body: createAsyncIterable([rewritten]) };
}
