/**
 * The escape sequences of `rexmesh shell`, read from the operator's input
 * the way ssh reads its own: a `~` at the start of a line (after Enter, or
 * first of all) followed by `.` closes the session at once, which is how an
 * operator leaves a session whose host stopped answering; `~?` lists them;
 * `~~` sends one `~`. Any other byte after the `~` goes on with it.
 */
export type EscapeAction = "close" | "help";

const TILDE = 0x7e;
const DOT = 0x2e;
const QUESTION = 0x3f;
const CR = 0x0d;
const LF = 0x0a;

export const ESCAPE_HELP = "Supported escape sequences (at the start of a line):\r\n  ~.  close the session\r\n  ~?  this help\r\n  ~~  send one ~\r\n";

export class EscapeScanner {
  private atLineStart = true;
  private pendingTilde = false;

  /** The bytes to send for a chunk of input, and the escapes it held, in order. */
  scan(chunk: Uint8Array): { send: Uint8Array; actions: EscapeAction[] } {
    const out: number[] = [];
    const actions: EscapeAction[] = [];
    for (const b of chunk) {
      if (this.pendingTilde) {
        this.pendingTilde = false;
        if (b === DOT) {
          actions.push("close");
          // Nothing after a close matters.
          return { send: Uint8Array.from(out), actions };
        }
        if (b === QUESTION) {
          actions.push("help");
          this.atLineStart = false;
          continue;
        }
        if (b !== TILDE) out.push(TILDE);
        out.push(b);
        this.atLineStart = b === CR || b === LF;
        continue;
      }
      if (this.atLineStart && b === TILDE) {
        this.pendingTilde = true;
        continue;
      }
      out.push(b);
      this.atLineStart = b === CR || b === LF;
    }
    return { send: Uint8Array.from(out), actions };
  }
}
