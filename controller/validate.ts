import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import { isDigest } from "../common/digest.js";
import { baseDirProblem, relativePathProblem } from "../common/put-path.js";
import { ansibleProblem, pythonProblem, textProblem } from "../common/tool-checks.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import { manifestOf } from "./releases.js";
import type { SignedRelease } from "../gen/rexmesh/v1/release_pb.js";

const MAX_STEPS = LIMITS.jobSteps;

/** Refuses step lists a daemon could not run, naming the step and field at fault. */
export function validateSteps(steps: readonly Step[]): void {
  if (steps.length === 0) throw new InvalidArgumentError("a job needs at least one step");
  if (steps.length > MAX_STEPS) throw new InvalidArgumentError(`a job may have at most ${MAX_STEPS} steps`);
  steps.forEach((step, i) => {
    const where = `step ${i + 1}${step.name ? ` (${step.name})` : ""}`;
    switch (step.tool.case) {
      case "exec": {
        const argv = step.tool.value.argv;
        if (argv.length === 0 || argv[0] === "") throw new InvalidArgumentError(`${where}: exec needs a program to run (argv is empty)`);
        for (const arg of argv) checkText(where, "argv", arg);
        break;
      }
      case "shell":
        if (step.tool.value.script.trim() === "") throw new InvalidArgumentError(`${where}: shell needs a script`);
        checkText(where, "script", step.tool.value.script);
        for (const arg of step.tool.value.interpreter) checkText(where, "interpreter", arg);
        break;
      case "script": {
        const t = step.tool.value;
        checkDigest(where, t.artifact);
        if (t.interpreter.length > 0 && t.interpreter[0] === "") throw new InvalidArgumentError(`${where}: script interpreter has an empty program name`);
        for (const arg of [...t.interpreter, ...t.args]) checkText(where, "script argument", arg);
        break;
      }
      case "filePut": {
        const t = step.tool.value;
        checkDigest(where, t.artifact);
        // Checked here so that a path escape is refused at submit; the daemon checks again, and resolves symlinks.
        const problem = baseDirProblem(t.baseDir) ?? relativePathProblem(t.path);
        if (problem !== undefined) throw new InvalidArgumentError(`${where}: file.put refused: ${problem}`);
        checkText(where, "path", t.path);
        checkText(where, "base_dir", t.baseDir);
        if (t.mode > 0o777) throw new InvalidArgumentError(`${where}: file.put mode ${t.mode.toString(8)} is more than 0777`);
        break;
      }
      case "python":
      case "ansible": {
        const problem = step.tool.case === "python" ? pythonProblem(step.tool.value) : ansibleProblem(step.tool.value);
        if (problem) throw new InvalidArgumentError(`${where}: ${problem}`);
        break;
      }
      case "ping":
        break;
      case "update":
        if (steps.length !== 1) throw new InvalidArgumentError(`${where}: an update step runs alone in its job`);
        checkReleases(where, step.tool.value.releases);
        break;
      default:
        throw new InvalidArgumentError(`${where}: names no tool (use exec, shell, script, file.put, python, ansible, ping or update)`);
    }
  });
}

function checkDigest(where: string, digest: string): void {
  if (!isDigest(digest)) throw new InvalidArgumentError(`${where}: artifact ${JSON.stringify(digest.slice(0, 80))} is not a digest of the form sha256:<64 lowercase hex digits>`);
}

function checkText(where: string, field: string, value: string): void {
  const problem = textProblem(field, value);
  if (problem) throw new InvalidArgumentError(`${where}: ${problem}`);
}

/** Platforms' releases an update step may carry at most. */
const MAX_UPDATE_RELEASES = 16;

/** An update step's releases: one to 16, well formed, of one version, each for another platform. */
function checkReleases(where: string, releases: readonly SignedRelease[]): void {
  if (releases.length === 0) throw new InvalidArgumentError(`${where}: update names no release`);
  if (releases.length > MAX_UPDATE_RELEASES) throw new InvalidArgumentError(`${where}: update carries at most ${MAX_UPDATE_RELEASES} releases (one per platform)`);
  const manifests = releases.map(manifestOf);
  const versions = new Set(manifests.map((m) => m.version));
  if (versions.size > 1) throw new InvalidArgumentError(`${where}: update carries releases of several versions (${[...versions].join(", ")}); one version, one release per platform`);
  const platforms = manifests.map((m) => m.platform);
  if (new Set(platforms).size !== platforms.length) throw new InvalidArgumentError(`${where}: update carries two releases for one platform`);
}
