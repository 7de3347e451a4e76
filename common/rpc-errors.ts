import { Code, ConnectError } from "@connectrpc/connect";
import { status as GrpcStatus } from "@grpc/grpc-js";
import {
  AlreadyExistsError,
  ConfigError,
  DeadlineExceededError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  UnauthenticatedError,
  UnavailableError,
} from "./errors.js";

/**
 * The one place where domain errors become wire codes. Anything that is not
 * a known domain error is INTERNAL with a generic message: its detail stays
 * in the log, never on the wire.
 */
export function codeOf(err: unknown): Code {
  if (isDecodeFailure(err)) return Code.InvalidArgument;
  if (err instanceof ConnectError) return err.code;
  if (err instanceof InvalidArgumentError || err instanceof ConfigError) return Code.InvalidArgument;
  if (err instanceof NotFoundError) return Code.NotFound;
  if (err instanceof PermissionDeniedError) return Code.PermissionDenied;
  if (err instanceof UnauthenticatedError) return Code.Unauthenticated;
  if (err instanceof FailedPreconditionError) return Code.FailedPrecondition;
  if (err instanceof AlreadyExistsError) return Code.AlreadyExists;
  if (err instanceof ResourceExhaustedError) return Code.ResourceExhausted;
  if (err instanceof UnavailableError) return Code.Unavailable;
  if (err instanceof DeadlineExceededError) return Code.DeadlineExceeded;
  return Code.Internal;
}

export function toConnectError(err: unknown): ConnectError {
  if (isDecodeFailure(err)) return new ConnectError("the request is not a valid protobuf message", Code.InvalidArgument, undefined, undefined, err);
  if (err instanceof ConnectError) return err.rawMessage.length > MAX_ERROR_MESSAGE_CHARS ? new ConnectError(bounded(err.rawMessage), err.code, err.metadata, undefined, err) : err;
  const code = codeOf(err);
  const message = code === Code.Internal ? "internal error" : err instanceof Error ? err.message : String(err);
  return new ConnectError(bounded(message), code, undefined, undefined, err);
}

/**
 * The longest error message a caller is sent, in characters. It travels in
 * an HTTP/2 trailer (percent-encoded: up to 9 bytes a character), and a
 * message that echoed a huge input (a proxy name of megabytes in a refused
 * hello) once made the trailer unsendable: nghttp2 then ends the whole
 * connection, every other call on it with it.
 */
export const MAX_ERROR_MESSAGE_CHARS = 1024;

function bounded(message: string): string {
  return message.length <= MAX_ERROR_MESSAGE_CHARS ? message : `${message.slice(0, MAX_ERROR_MESSAGE_CHARS)}… (cut)`;
}

/**
 * A request connect-es could not decode: it reports one as INTERNAL
 * ("parse binary: ..."), though the caller sent it, so it is mapped here
 * like any malformed request. (JSON that does not parse is already
 * INVALID_ARGUMENT.)
 */
export function isDecodeFailure(err: unknown): boolean {
  return err instanceof ConnectError && err.code === Code.Internal && err.rawMessage.startsWith("parse binary:");
}

/** Connect and gRPC share code numbers; grpc-js wants its own enum. */
export function toGrpcStatus(err: unknown): { code: GrpcStatus; details: string } {
  const c = toConnectError(err);
  return { code: c.code as number as GrpcStatus, details: c.rawMessage };
}

/** Codes worth retrying: the peer was unreachable or busy, not wrong. */
export function isRetryable(code: Code): boolean {
  return code === Code.Unavailable || code === Code.ResourceExhausted || code === Code.DeadlineExceeded || code === Code.Aborted;
}
