/**
 * The public TriggerService (docs/triggers.md). Handlers only translate:
 * the boundary (controller/declarations.ts) admitted the caller and its
 * action; scopes are decided by TriggerAccess.
 */
import { fromBinary } from "@bufbuild/protobuf";
import type { ServiceImpl } from "@connectrpc/connect";
import { InvalidArgumentError } from "../common/errors.js";
import { checkChars, LIMITS } from "../common/limits.js";
import { checkSubmitLimits } from "./request-limits.js";
import { grantedPeer } from "../common/connect-server.js";
import { SubmitJobRequestSchema } from "../gen/rexmesh/v1/controller_pb.js";
import type { TriggerService } from "../gen/rexmesh/v1/trigger_pb.js";
import { describeRequest } from "./access.js";
import { submitRequestOf } from "./planner.js";
import type { TriggerAccess } from "./trigger-access.js";
import type { TriggerRecord } from "./trigger-store.js";
import { storedEventToProto, triggerToProto } from "./triggers.js";

const WHAT_CHARS = 200;

export function triggerServiceImpl(deps: { triggers: TriggerAccess }): ServiceImpl<typeof TriggerService> {
  const { triggers } = deps;
  const shown = (rec: TriggerRecord, withJob: boolean) => {
    const what = describeRequest(submitRequestOf(fromBinary(SubmitJobRequestSchema, rec.request)));
    return triggerToProto(rec, what.length > WHAT_CHARS ? `${what.slice(0, WHAT_CHARS)}…` : what, withJob);
  };
  // Sizes first, before anything is looked up (common/limits.ts; a job as SubmitJob's).
  const name = (n: string) => checkChars("name", n, LIMITS.idChars);
  return {
    listEvents(req, ctx) {
      checkChars("target", req.target, LIMITS.queryChars);
      checkChars("kind", req.kind, LIMITS.eventNameChars);
      checkChars("page_token", req.pageToken, LIMITS.refChars);
      const page = triggers.listEvents(grantedPeer(ctx), { target: req.target, kind: req.kind, pageSize: req.pageSize, pageToken: req.pageToken });
      return { events: page.events.map(storedEventToProto), nextPageToken: page.next };
    },
    async createTrigger(req, ctx) {
      if (!req.trigger) throw new InvalidArgumentError("CreateTrigger needs the trigger");
      name(req.trigger.name);
      checkChars("on", req.trigger.on, LIMITS.triggerMatchChars);
      if (req.trigger.job) checkSubmitLimits(req.trigger.job);
      return { trigger: shown(await triggers.createTrigger(grantedPeer(ctx), req.trigger), true) };
    },
    listTriggers(_req, ctx) {
      return { triggers: triggers.listTriggers(grantedPeer(ctx)).map((r) => shown(r, false)) };
    },
    getTrigger(req, ctx) {
      name(req.name);
      return { trigger: shown(triggers.getTrigger(grantedPeer(ctx), req.name), true) };
    },
    async pauseTrigger(req, ctx) {
      name(req.name);
      return { trigger: shown(await triggers.pauseTrigger(grantedPeer(ctx), req.name, req.paused), true) };
    },
    async deleteTrigger(req, ctx) {
      name(req.name);
      await triggers.deleteTrigger(grantedPeer(ctx), req.name);
      return {};
    },
  };
}
