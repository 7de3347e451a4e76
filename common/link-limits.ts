/**
 * Checks of the items that arrive on the links — what a host reports to its
 * proxy, what a proxy relays to the controller, and the acknowledgements
 * that come back down — made where a frame enters, before anything is
 * stored or looked up. Sizes come from {@link LIMITS}.
 *
 * An item that fails is dropped with a warning (one per frame) and not
 * acknowledged; the rest of the frame and the stream go on. Failing the
 * stream instead would let one host's bad report, relayed by its proxy,
 * end the link that carries every other host of the region, and a sender
 * that keeps the item would send it again on every new stream.
 */
import type { Logger } from "./logger.js";
import { LIMITS, preview, truncate } from "./limits.js";
import type { AgentStreamRequest } from "../gen/rexmesh/v1/agent_link_pb.js";
import type { CancelTask, HostPresence, ProxyStreamRequest, ProxyStreamResponse, StatusAckRun } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { acksOfRuns, statusesOfRuns } from "./status-runs.js";
import type { EventAck, HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import { eventNameProblem, eventProblem } from "./host-event.js";
import { TaskState, type OutputAck, type OutputChunk, type StatusAck, type TaskStatus } from "../gen/rexmesh/v1/task_pb.js";

/** Task ids are made by the controller; this bounds what a peer may name. */
export const TASK_ID_CHARS = LIMITS.taskIdChars;

/**
 * Tasks a proxy takes on from one host's reports (tasks it was never sent:
 * the host brought them from another proxy of the region) and holds at
 * once. A host has at most its capacity running and the ends it has not
 * had acknowledged; beyond this a host is inventing ids. Reports on more
 * wait, unacknowledged, for the host's next stream.
 */
export const TAKEN_ON_TASKS_PER_HOST = LIMITS.takenOnTasksPerHost;

const STATES: ReadonlySet<number> = new Set(Object.values(TaskState).filter((v): v is number => typeof v === "number"));
const MAX_SEQ = BigInt(Number.MAX_SAFE_INTEGER);

/** Why a task id is refused, or undefined. */
function taskIdProblem(id: string): string | undefined {
  if (id === "") return "task_id is empty";
  if (id.length > TASK_ID_CHARS) return `task_id is longer than ${TASK_ID_CHARS} characters (${id.length}): ${preview(id)}`;
  return undefined;
}

/** Why a host id or tenant named beside a report is refused, or undefined. Empty is allowed where the field is optional. */
function idProblem(field: string, id: string, optional = true): string | undefined {
  if (id === "" && !optional) return `${field} is empty`;
  if (id.length > LIMITS.idChars) return `${field} is longer than ${LIMITS.idChars} characters (${id.length}): ${preview(id)}`;
  return undefined;
}

/** Why an output seq (of a chunk or an ack) is refused: chunks count from 1, and every seq must survive Number(). */
function seqProblem(seq: bigint): string | undefined {
  if (seq < 1n || seq > MAX_SEQ) return `seq ${seq} is not an integer from 1 to ${MAX_SEQ}`;
  return undefined;
}

/** Why a task state is refused: one this version does not define has no place in the order of progress. */
function stateProblem(state: number): string | undefined {
  return STATES.has(state) ? undefined : `state ${state} is not a task state`;
}

// Each stops at the first problem: items are checked on every frame.
const outputProblem = (c: OutputChunk) => taskIdProblem(c.taskId) ?? seqProblem(c.seq) ?? idProblem("host_id", c.hostId);
const statusProblem = (s: TaskStatus) => taskIdProblem(s.taskId) ?? stateProblem(s.state) ?? idProblem("host_id", s.hostId);
const outputAckProblem = (a: OutputAck) => taskIdProblem(a.taskId) ?? seqProblem(a.seq);
const statusAckProblem = (a: StatusAck) => taskIdProblem(a.taskId) ?? stateProblem(a.state);
const cancelProblem = (c: CancelTask) => taskIdProblem(c.taskId) ?? idProblem("host_id", c.hostId);
/** An event's report key rides along for the controller to check (a certificate and an endorsement: a few KiB at most). */
const REPORT_KEY_BYTES = 16 * 1024;
const hostEventProblem = (e: HostEvent) =>
  eventProblem(e) ??
  (e.reportKey && e.reportKey.hostCertificate.length + e.reportKey.publicKey.length + e.reportKey.endorsement.length + e.reportKey.keyId.length > REPORT_KEY_BYTES ? "the event's report key is too large" : undefined);
const eventAckProblem = (a: EventAck) => idProblem("host_id", a.hostId, false) ?? eventNameProblem("event_id", a.eventId);
const presenceProblem = (h: HostPresence) => idProblem("host_id", h.hostId, false) ?? idProblem("tenant", h.tenant, false);

/** What a frame's checks refused: counted, the first reason kept, so that a frame of bad items costs one log line. */
class Refused {
  count = 0;
  firstReason: string | undefined;
  firstField: string | undefined;

  /** The items of `list` that pass `problem` (`list` itself when all do); the others are counted under `field`. */
  keep<T>(field: string, list: T[], problem: (item: T) => string | undefined): T[] {
    let out: T[] | undefined;
    for (let i = 0; i < list.length; i++) {
      const why = problem(list[i]!);
      if (why === undefined) {
        out?.push(list[i]!);
        continue;
      }
      out ??= list.slice(0, i);
      this.count++;
      this.firstReason ??= why;
      this.firstField ??= field;
    }
    return out ?? list;
  }

  /** Counts one refused item under `field`. */
  note(field: string, why: string): void {
    this.count++;
    this.firstReason ??= why;
    this.firstField ??= field;
  }

  /** One warning for the frame, if anything was refused. */
  warn(log: Logger, what: string, fields: Record<string, unknown> = {}): void {
    if (this.count > 0) log.warn(what, { ...fields, refused: this.count, field: this.firstField, reason: this.firstReason });
  }
}

/**
 * Cuts, in place, a status's message and signal to their limits, so that
 * one status can never make a frame too large for the link. The message is
 * words about the task that the host's signature over its end does not
 * cover; the signal is covered, but no daemon names one that long (a host
 * that does loses its signature's check, as if it had sent none).
 */
function cutStatusText(statuses: readonly TaskStatus[]): void {
  for (const s of statuses) {
    if (s.message.length > LIMITS.statusMessageChars) s.message = truncate(s.message, LIMITS.statusMessageChars);
    if (s.signal.length > LIMITS.statusSignalChars) s.signal = truncate(s.signal, LIMITS.statusSignalChars);
  }
}

/** Drops, in place, the reports of a host's frame (AgentLink at the proxy) that no daemon sends; cuts overlong status text. */
export function screenHostFrame(frame: AgentStreamRequest): Refused {
  const r = new Refused();
  frame.output = r.keep("output", frame.output, outputProblem);
  frame.statuses = r.keep("statuses", frame.statuses, statusProblem);
  cutStatusText(frame.statuses);
  frame.events = r.keep("events", frame.events, hostEventProblem);
  return r;
}

/**
 * Drops, in place, the reports and presences no proxy sends: of a proxy's
 * frame (ProxyLink at the controller), or of a results bundle, which is
 * applied like the frames of the proxy that signed it.
 */
export function screenProxyReports(reports: { hosts: HostPresence[]; output: OutputChunk[]; statuses: TaskStatus[]; events?: HostEvent[] }, r = new Refused()): Refused {
  reports.hosts = r.keep("hosts", reports.hosts, presenceProblem);
  reports.output = r.keep("output", reports.output, outputProblem);
  reports.statuses = r.keep("statuses", reports.statuses, statusProblem);
  cutStatusText(reports.statuses);
  if (reports.events) reports.events = r.keep("events", reports.events, hostEventProblem);
  return r;
}

/**
 * {@link screenProxyReports} of a proxy's frame, its hello's hosts included.
 * Its status runs become statuses first, ahead of the others (the order they
 * apply in), so every check and everything after sees statuses only.
 */
export function screenProxyFrame(frame: ProxyStreamRequest): Refused {
  const pre = new Refused();
  if (frame.statusRuns.length > 0) {
    frame.statuses = [...statusesOfRuns(frame.statusRuns, (why) => pre.note("status_runs", why)), ...frame.statuses];
    frame.statusRuns = [];
  }
  const r = screenProxyReports(frame, pre);
  if (frame.hello) frame.hello.hosts = r.keep("hello.hosts", frame.hello.hosts, presenceProblem);
  return r;
}

/**
 * Drops, in place, acknowledgements no receiver sends (toward a proxy from
 * the controller or a tasks bundle, toward a daemon from its proxy): an ack
 * names a task id, a seq it could have been sent, and a defined state.
 */
export function screenAcks(frame: { outputAcks: OutputAck[]; statusAcks: StatusAck[]; statusAckRuns?: StatusAckRun[]; eventAcks?: EventAck[] }, r = new Refused()): Refused {
  // Runs of acknowledgements become acknowledgements, ahead of the others (the order they apply in).
  if (frame.statusAckRuns?.length) {
    frame.statusAcks = [...acksOfRuns(frame.statusAckRuns), ...frame.statusAcks];
    frame.statusAckRuns = [];
  }
  frame.outputAcks = r.keep("output_acks", frame.outputAcks, outputAckProblem);
  frame.statusAcks = r.keep("status_acks", frame.statusAcks, statusAckProblem);
  if (frame.eventAcks) frame.eventAcks = r.keep("event_acks", frame.eventAcks, eventAckProblem);
  return r;
}

/** Drops, in place, the acknowledgements and cancels of a controller's frame (ProxyLink at the proxy, or a tasks bundle) that no controller sends. */
export function screenControllerFrame(frame: ProxyStreamResponse): Refused {
  const r = screenAcks(frame);
  frame.cancels = r.keep("cancels", frame.cancels, cancelProblem);
  return r;
}
