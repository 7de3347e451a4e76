/**
 * Domain errors. Logic throws these; one function per boundary
 * (common/rpc-errors.ts) maps them to gRPC/Connect codes. The message is
 * safe to show to a client; internal detail belongs in `cause`.
 */
export class RexmeshError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The request is malformed or names something impossible. */
export class InvalidArgumentError extends RexmeshError {}
/** The thing asked for does not exist (or is not visible to the caller). */
export class NotFoundError extends RexmeshError {}
/** The caller is known but not allowed to do this. */
export class PermissionDeniedError extends RexmeshError {}
/** The caller could not be identified, or presented the wrong kind of identity. */
export class UnauthenticatedError extends RexmeshError {}
/** The system is not in a state where this can be done. */
export class FailedPreconditionError extends RexmeshError {}
/** A limit was reached: storage full, queue full, too many requests. */
export class ResourceExhaustedError extends RexmeshError {}
/** A peer or dependency cannot be reached now; retrying may help. */
export class UnavailableError extends RexmeshError {}
/** The operation's deadline passed. */
export class DeadlineExceededError extends RexmeshError {}
/** A configuration value is wrong; the message names the key. */
export class ConfigError extends RexmeshError {}
/** The thing to create exists already, and differs from what was asked. */
export class AlreadyExistsError extends RexmeshError {
  /** The job that holds a reused idempotency key, when that is what exists. */
  jobId?: string;
}
