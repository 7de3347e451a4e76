import { InvalidArgumentError } from "../common/errors.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";

const MAX_STEPS = 64;
const MAX_ARG_BYTES = 128 * 1024;

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
      default:
        throw new InvalidArgumentError(`${where}: names no tool (use exec or shell)`);
    }
  });
}

function checkText(where: string, field: string, value: string): void {
  if (value.includes("\0")) throw new InvalidArgumentError(`${where}: ${field} contains a NUL byte`);
  if (Buffer.byteLength(value) > MAX_ARG_BYTES) throw new InvalidArgumentError(`${where}: ${field} is longer than ${MAX_ARG_BYTES} bytes`);
}
