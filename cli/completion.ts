import { InvalidArgumentError } from "../common/errors.js";
import type { Io } from "./operator.js";

/** Commands and the words that may follow them, for shell completion. */
const TREE: Record<string, string[]> = {
  run: ["--hosts", "--all", "--target", "--shell", "--timeout", "--deadline", "--env", "--cwd", "--stdin", "--json", "--detach", "--concurrency", "--concurrency-per-region", "--max-errors", "--batch", "--output-limit", "--doc", "--param", "--dry-run", "--script", "--put", "--to", "--base-dir", "--mode", "--idempotency-key", "--help"],
  hosts: ["label", "queue", "revoke", "--target", "--unfinished", "--limit", "--page", "--json", "--help"],
  jobs: ["show", "watch", "cancel", "--json", "--help"],
  proxies: ["revoke"],
  operators: ["revoke"],
  tokens: ["create"],
  audit: ["--since", "--limit", "--json", "--help"],
  docs: ["put", "list", "show"],
  artifacts: ["put"],
  bundle: ["export", "import", "--region"],
  ca: ["init", "issue", "--dir", "--role", "--id", "--tenant", "--region", "--out"],
  dev: ["roles", "kill", "restart", "--hosts", "--regions", "--proxies-per-region", "--tenants", "--label", "--inventory", "--dir", "--hosts-per-process", "--demo", "--log-level", "--signal", "--json", "--help"],
  controller: ["--config", "--print-config", "--help"],
  proxy: ["bundle", "--config", "--print-config", "--help"],
  daemon: ["--config", "--print-config", "--help"],
  completion: ["bash", "zsh"],
  ping: ["--hosts", "--all", "--target", "--timeout", "--json", "--help"],
  shell: ["--tty", "--no-tty", "--help"],
  forward: ["--help"],
  sessions: ["play", "join", "--limit", "--speed", "--input", "--json", "--help"],
  release: ["keygen", "sign", "--out", "--version", "--platform", "--key", "--json", "--help"],
  schedules: ["add", "list", "show", "pause", "resume", "remove", "run-now", "--cron", "--tz", "--misfire", "--grace", "--overlap", "--json", "--help"],
  triggers: ["add", "list", "show", "pause", "resume", "remove", "--on", "--run", "--cooldown", "--max-per-host", "--json", "--help"],
  events: ["--target", "--kind", "--limit", "--json", "--help"],
};

function bash(): string {
  const cases = Object.entries(TREE)
    .map(([cmd, words]) => `    ${cmd}) COMPREPLY=( $(compgen -W "${words.join(" ")}" -- "$cur") ) ;;`)
    .join("\n");
  return `# rexmesh bash completion: source <(rexmesh completion bash)
_rexmesh() {
  local cur="\${COMP_WORDS[COMP_CWORD]}"
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=( $(compgen -W "${Object.keys(TREE).join(" ")} help" -- "$cur") )
    return
  fi
  case "\${COMP_WORDS[1]}" in
${cases}
  esac
}
complete -o default -F _rexmesh rexmesh
`;
}

/** `rexmesh completion bash|zsh`: a completion script for the shell. */
export async function completionCommand(argv: string[], io: Io): Promise<number> {
  const shell = argv[0];
  if (shell === "bash") io.out(bash());
  else if (shell === "zsh") io.out(`# rexmesh zsh completion: source <(rexmesh completion zsh)\nautoload -U +X bashcompinit && bashcompinit\n${bash()}`);
  else throw new InvalidArgumentError("say which shell: rexmesh completion bash | zsh");
  return 0;
}
