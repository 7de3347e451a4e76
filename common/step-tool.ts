import { fromBinary } from "@bufbuild/protobuf";
import { ReleaseManifestSchema } from "../gen/rexmesh/v1/release_pb.js";
import { StepSchema, type Step } from "../gen/rexmesh/v1/task_pb.js";

/**
 * The tool a step uses, by the name hosts report in facts.tools and policies
 * use: the oneof field's proto name with "_" as "." (file_put → file.put).
 */
export function toolName(step: Step): string {
  const field = StepSchema.fields.find((f) => f.localName === step.tool.case);
  return (field?.name ?? String(step.tool.case)).replaceAll("_", ".");
}

/** Why a host with `tools` cannot run `steps` (the first step whose tool it lacks), or undefined. */
export function missingTool(steps: readonly Step[], tools: readonly string[]): string | undefined {
  for (const [i, step] of steps.entries()) {
    if (step.tool.case === undefined) continue;
    const tool = toolName(step);
    if (!tools.includes(tool)) {
      return `step ${i + 1}${step.name ? ` (${step.name})` : ""} needs the ${tool} tool, which this host does not have (its tools: ${tools.join(", ") || "none"})`;
    }
  }
  return undefined;
}

/**
 * The artifacts a step fetches from the repository ("sha256:<hex>"): a
 * script, a file to put, a python script or ansible playbook named by
 * digest, or each platform's release artifact. The controller checks the
 * caller's tenant holds them; bundles carry them to sites with no link.
 */
export function stepArtifacts(step: Step): string[] {
  switch (step.tool.case) {
    case "script":
    case "filePut":
      return [step.tool.value.artifact];
    case "python":
    case "ansible":
      // Either a script or playbook in the request, or one from the repository.
      return step.tool.value.artifact ? [step.tool.value.artifact] : [];
    case "update":
      return step.tool.value.releases.flatMap((r) => {
        try {
          const digest = fromBinary(ReleaseManifestSchema, r.manifest).digest;
          return digest ? [digest] : [];
        } catch {
          return [];
        }
      });
    default:
      return [];
  }
}
