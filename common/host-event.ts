/**
 * What makes a host event well formed (docs/triggers.md): the checks a
 * daemon's watchers keep to and every hop applies before it stores or
 * relays an event. Sizes come from {@link LIMITS}.
 */
import { LIMITS, preview } from "./limits.js";
import type { HostEvent } from "../gen/rexmesh/v1/event_pb.js";

/** Event ids, kinds and detail keys. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** Why a name (id, kind, detail key) is refused, or undefined. */
export function eventNameProblem(field: string, value: string): string | undefined {
  if (value.length === 0) return `${field} is empty`;
  if (value.length > LIMITS.eventNameChars) return `${field} is longer than ${LIMITS.eventNameChars} characters (${value.length}): ${preview(value)}`;
  if (!NAME.test(value)) return `${field} ${preview(value)} is not letters, digits, '.', '_' or '-' (starting with a letter or digit)`;
  return undefined;
}

/** Why an event is refused, or undefined: its names, its ids and the number and sizes of its details. */
export function eventProblem(e: HostEvent): string | undefined {
  const named = eventNameProblem("event id", e.id) ?? eventNameProblem("event kind", e.kind);
  if (named) return named;
  if (e.hostId === "" || e.hostId.length > LIMITS.idChars) return `host_id must be 1 to ${LIMITS.idChars} characters`;
  if (e.tenant === "" || e.tenant.length > LIMITS.idChars) return `tenant must be 1 to ${LIMITS.idChars} characters`;
  if (e.watcher.length > LIMITS.eventNameChars) return `watcher is longer than ${LIMITS.eventNameChars} characters`;
  if (e.keyId.length > 64 || e.signature.length > 256) return "the event's key id or signature is too long";
  const keys = Object.keys(e.details);
  if (keys.length > LIMITS.eventDetails) return `the event has ${keys.length} details; at most ${LIMITS.eventDetails}`;
  for (const k of keys) {
    const why = eventNameProblem("detail key", k);
    if (why) return why;
    const v = e.details[k]!;
    if (v.length > LIMITS.eventDetailValueChars) return `detail ${k} is longer than ${LIMITS.eventDetailValueChars} characters`;
  }
  return undefined;
}

/** Rough wire size of an event, for frame sizing and backlog accounting. */
export function eventBytes(e: HostEvent): number {
  let n = 192 + e.id.length + e.kind.length + e.hostId.length + e.tenant.length + e.watcher.length + e.signature.length;
  for (const [k, v] of Object.entries(e.details)) n += k.length + v.length + 8;
  return n;
}

/** An event's identity at any hop: the host's id and the event's own. */
export function eventKey(hostId: string, eventId: string): string {
  return `e/${hostId}/${eventId}`;
}
