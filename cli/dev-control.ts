import { randomBytes, timingSafeEqual } from "node:crypto";
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { FailedPreconditionError, RexmeshError } from "../common/errors.js";

/**
 * How `rexmesh dev kill|restart|roles`, run in another terminal, reach the
 * `rexmesh dev` that owns a mesh: that process listens on a loopback port
 * and writes `control.json` in the mesh directory (mode 0600: the port, its
 * pid and a random token). A command reads the file, connects, sends one
 * JSON line `{token, op, role?, signal?}` and reads one JSON line back:
 * `{ok: true, message?, roles?}` or `{ok: false, error}`. The file goes away
 * when the mesh stops; one left by a mesh that was killed is recognised by
 * the refused connection.
 */
export const CONTROL_FILE = "control.json";

/** A request line longer than this is refused: the requests are a few words. */
const MAX_REQUEST_BYTES = 4096;
/** How long the server waits for a request line. */
const REQUEST_TIMEOUT_MS = 10_000;
/** How long a command waits for an answer: a restart waits for the role to be ready. */
const ANSWER_TIMEOUT_MS = 120_000;

export interface ControlRequest {
  op: "roles" | "kill" | "restart";
  role?: string;
  signal?: string;
}

export interface ControlAnswer {
  ok: boolean;
  message?: string;
  error?: string;
  roles?: unknown[];
}

interface ControlFile {
  pid: number;
  port: number;
  token: string;
}

/** Serves control requests for a mesh directory until closed; `handle` throws to answer with an error. */
export async function serveControl(dir: string, handle: (req: ControlRequest) => Promise<Omit<ControlAnswer, "ok">>): Promise<{ close: () => Promise<void> }> {
  const token = randomBytes(32).toString("hex");
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    // A request is one short line: a connection that sends none is not kept.
    socket.setTimeout(REQUEST_TIMEOUT_MS, () => socket.destroy());
    socket.on("error", () => socket.destroy());
    let buffered = "";
    const onData = (data: Buffer) => {
      buffered += data.toString("utf8");
      const end = buffered.indexOf("\n");
      if (end < 0) {
        if (buffered.length > MAX_REQUEST_BYTES) {
          socket.off("data", onData);
          socket.end(JSON.stringify({ ok: false, error: "request too long" }) + "\n");
        }
        return;
      }
      socket.off("data", onData);
      socket.setTimeout(0); // the answer may take a while: a restart waits for the role to be ready
      answer(buffered.slice(0, end)).then(
        (a) => socket.end(JSON.stringify(a) + "\n"),
        () => socket.destroy(),
      );
    };
    socket.on("data", onData);
  });
  const answer = async (line: string): Promise<ControlAnswer> => {
    let req: ControlRequest & { token?: unknown };
    try {
      req = JSON.parse(line) as ControlRequest & { token?: unknown };
    } catch {
      return { ok: false, error: "the request is not JSON" };
    }
    const given = Buffer.from(typeof req.token === "string" ? req.token : "");
    const want = Buffer.from(token);
    if (given.length !== want.length || !timingSafeEqual(given, want)) return { ok: false, error: `wrong token: not the ${CONTROL_FILE} of this mesh` };
    try {
      return { ok: true, ...(await handle(req)) };
    } catch (err) {
      return { ok: false, error: err instanceof Error ? err.message : String(err) };
    }
  };
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.address() as { port: number }).port;
  const file = join(dir, CONTROL_FILE);
  const content: ControlFile = { pid: process.pid, port, token };
  writeFileSync(`${file}.tmp`, JSON.stringify(content) + "\n", { mode: 0o600 });
  renameSync(`${file}.tmp`, file);
  return {
    close: () =>
      new Promise<void>((resolve) => {
        rmSync(file, { force: true });
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Thrown when no `rexmesh dev` answers for a directory. */
export class NoMeshError extends FailedPreconditionError {}

/** Sends one request to the `rexmesh dev` of a mesh directory; throws its error as a one-line Error. */
export async function askMesh(dir: string, req: ControlRequest): Promise<ControlAnswer> {
  const file = join(dir, CONTROL_FILE);
  if (!existsSync(file)) throw new NoMeshError(`no dev mesh running in ${dir} (no ${CONTROL_FILE} there; start one with rexmesh dev --dir ${dir})`);
  let control: ControlFile;
  try {
    control = JSON.parse(readFileSync(file, "utf8")) as ControlFile;
  } catch (err) {
    throw new NoMeshError(`no dev mesh running in ${dir} (${CONTROL_FILE} cannot be read: ${(err as Error).message.split("\n")[0]})`);
  }
  if (!Number.isInteger(control?.port) || control.port < 1 || control.port > 65535 || typeof control.token !== "string") {
    throw new NoMeshError(`no dev mesh running in ${dir} (${CONTROL_FILE} is not one that rexmesh dev wrote)`);
  }
  const line = await new Promise<string>((resolve, reject) => {
    const socket = createConnection({ host: "127.0.0.1", port: control.port });
    let text = "";
    socket.setTimeout(ANSWER_TIMEOUT_MS, () => socket.destroy(new Error(`no answer from rexmesh dev (pid ${control.pid}) after ${ANSWER_TIMEOUT_MS / 1000} s`)));
    socket.on("connect", () => socket.write(JSON.stringify({ ...req, token: control.token }) + "\n"));
    socket.on("data", (d: Buffer) => (text += d.toString("utf8")));
    socket.on("end", () => resolve(text));
    socket.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ECONNREFUSED") reject(new NoMeshError(`no dev mesh running in ${dir} (its ${CONTROL_FILE} is left from rexmesh dev pid ${control.pid}, which is gone)`));
      else reject(err);
    });
  });
  let answer: ControlAnswer;
  try {
    answer = JSON.parse(line) as ControlAnswer;
  } catch {
    throw new RexmeshError(`rexmesh dev (pid ${control.pid}) gave no answer`);
  }
  if (!answer.ok) throw new RexmeshError(answer.error ?? "refused");
  return answer;
}

/** Whether a `rexmesh dev` answers for a directory now. */
export async function meshRunning(dir: string): Promise<boolean> {
  try {
    await askMesh(dir, { op: "roles" });
    return true;
  } catch (err) {
    if (err instanceof NoMeshError) return false;
    return true;
  }
}
