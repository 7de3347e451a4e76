import { useEffect, useMemo, useState } from "preact/hooks";
import { parse as parseYaml } from "yaml";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { SubmitJobRequestSchema, type Document, type PlannedTask } from "../../gen/rexmesh/v1/controller_pb.js";
import { StepSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { api, background, describeError } from "./api.js";
import { Alert, Heads } from "./ui.js";
import { describeStep } from "./format.js";

/** A document's parameter as declared (controller/params.ts has every rule; the controller checks them again). */
interface Param {
  name: string;
  type: "string" | "int" | "bool" | "enum" | "list";
  description?: string;
  default?: unknown;
  required?: boolean;
  sensitive?: boolean;
  values?: string[];
  pattern?: string;
  maxLength?: number;
}

/** The parameters a document declares, read from its text; an unreadable document offers none. */
function paramsOf(doc: Document | undefined): Param[] {
  if (!doc) return [];
  try {
    const parsed = parseYaml(doc.content) as { parameters?: Param[] };
    return Array.isArray(parsed?.parameters) ? parsed.parameters.filter((p) => typeof p?.name === "string") : [];
  } catch {
    return [];
  }
}

/** Input limits of the form; the controller enforces its own (docs/security.md, Input limits). */
const MAX_COMMAND = 65536;
const MAX_TARGET = 4096;

export function SubmitPage() {
  const [mode, setMode] = useState<"shell" | "exec" | "document">("shell");
  const [command, setCommand] = useState("");
  const [docs, setDocs] = useState<Document[]>([]);
  const [docName, setDocName] = useState("");
  const [values, setValues] = useState<Record<string, string>>({});
  const [targetKind, setTargetKind] = useState<"hosts" | "query" | "all">("hosts");
  const [target, setTarget] = useState("");
  const [timeout, setTimeoutS] = useState("");
  const [plan, setPlan] = useState<PlannedTask[] | undefined>(undefined);
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    api.listDocuments({}).then(
      (r) => setDocs(r.documents),
      () => undefined,
    );
  }, []);
  const doc = docs.find((d) => d.name === docName);
  const params = useMemo(() => paramsOf(doc), [doc]);

  const request = (dryRun: boolean) => {
    const parameters: Record<string, string> = {};
    for (const p of params) if (values[p.name] !== undefined && values[p.name] !== "") parameters[p.name] = values[p.name]!;
    const hostIds = targetKind === "hosts" ? target.split(/[\s,]+/).filter(Boolean) : [];
    const t = Number(timeout);
    return create(SubmitJobRequestSchema, {
      dryRun,
      hostIds,
      allHosts: targetKind === "all",
      ...(targetKind === "query" ? { target } : {}),
      ...(mode === "document"
        ? { document: doc ? `${doc.name}@${doc.version}` : docName, parameters }
        : { steps: [create(StepSchema, mode === "shell" ? { tool: { case: "shell", value: { script: command } } } : { tool: { case: "exec", value: { argv: command.trim().split(/\s+/) } } })] }),
      ...(timeout && t > 0 ? { timeout: durationFromMs(t * 1000) } : {}),
    });
  };
  const run = async (dryRun: boolean) => {
    setBusy(true);
    setError("");
    try {
      const res = await api.submitJob(request(dryRun));
      if (dryRun) setPlan(res.plan);
      else if (res.job) location.hash = `#/jobs/${encodeURIComponent(res.job.id)}`;
    } catch (err) {
      setError(describeError(err));
      if (dryRun) setPlan(undefined);
    } finally {
      setBusy(false);
    }
  };

  return (
    <section aria-labelledby="run-h">
      <h1 id="run-h">Run</h1>
      <form
        class="submit"
        onSubmit={(e) => {
          e.preventDefault();
          background(run(false));
        }}
      >
        <fieldset>
          <legend>What</legend>
          <label>
            <input type="radio" name="mode" checked={mode === "shell"} onChange={() => setMode("shell")} /> Shell script
          </label>
          <label>
            <input type="radio" name="mode" checked={mode === "exec"} onChange={() => setMode("exec")} /> Command (argv, no shell)
          </label>
          <label>
            <input type="radio" name="mode" checked={mode === "document"} onChange={() => setMode("document")} /> Document
          </label>
          {mode !== "document" ? (
            <label class="block">
              {mode === "shell" ? "Script" : "Command"}
              <textarea name="command" rows={3} maxLength={MAX_COMMAND} required value={command} onInput={(e) => setCommand(e.currentTarget.value)} />
            </label>
          ) : (
            <>
              <label class="block">
                Document
                <select name="document" required value={docName} onChange={(e) => (setDocName(e.currentTarget.value), setValues({}))}>
                  <option value="">choose…</option>
                  {docs.map((d) => (
                    <option key={d.name} value={d.name}>
                      {d.name}@{d.version}
                      {d.description ? ` — ${d.description}` : ""}
                    </option>
                  ))}
                </select>
              </label>
              {params.map((p) => (
                <ParamInput key={p.name} param={p} value={values[p.name] ?? ""} onChange={(v) => setValues({ ...values, [p.name]: v })} />
              ))}
            </>
          )}
        </fieldset>
        <fieldset>
          <legend>Where</legend>
          <label>
            <input type="radio" name="target" checked={targetKind === "hosts"} onChange={() => setTargetKind("hosts")} /> Host ids
          </label>
          <label>
            <input type="radio" name="target" checked={targetKind === "query"} onChange={() => setTargetKind("query")} /> Host query
          </label>
          <label>
            <input type="radio" name="target" checked={targetKind === "all"} onChange={() => setTargetKind("all")} /> Every host
          </label>
          {targetKind !== "all" && (
            <label class="block">
              {targetKind === "hosts" ? "Hosts (comma or space separated)" : "Query"}
              <input name="hosts" required maxLength={MAX_TARGET} value={target} onInput={(e) => setTarget(e.currentTarget.value)} />
            </label>
          )}
          <label class="block">
            Timeout per host (seconds, optional)
            <input name="timeout" inputMode="numeric" maxLength={9} value={timeout} onInput={(e) => setTimeoutS(e.currentTarget.value)} />
          </label>
        </fieldset>
        <div class="actions">
          <button type="button" disabled={busy} onClick={() => background(run(true))}>
            Preview (dry run)
          </button>
          <button type="submit" disabled={busy} class="primary">
            Submit
          </button>
        </div>
      </form>
      <Alert text={error} />
      {plan && (
        <table>
          <caption>Dry run: {plan.length} hosts; nothing was stored or run</caption>
          <Heads cols={["Host", "Region", "Proxy", "Connected", "Steps rendered for it"]} />
          <tbody>
            {plan.map((p) => (
              <tr key={p.hostId}>
                <td>{p.hostId}</td>
                <td>{p.region}</td>
                <td>{p.proxy}</td>
                <td>{p.connected ? "yes" : "no"}</td>
                <td class="what">{p.rejected ? `rejected: ${p.rejected}` : p.steps.map(describeStep).join("; ")}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}

function ParamInput({ param: p, value, onChange }: { param: Param; value: string; onChange: (v: string) => void }) {
  const id = `param-${p.name}`;
  const hint = [p.type, p.required ? "required" : "", p.default !== undefined && !p.sensitive ? `default ${JSON.stringify(p.default)}` : "", p.description ?? ""].filter(Boolean).join(" · ");
  const common = { id, name: p.name, required: p.required && p.default === undefined, "aria-describedby": `${id}-hint` };
  let input;
  if (p.type === "bool")
    input = (
      <select {...common} value={value} onChange={(e) => onChange(e.currentTarget.value)}>
        <option value="">(default)</option>
        <option value="true">true</option>
        <option value="false">false</option>
      </select>
    );
  else if (p.type === "enum")
    input = (
      <select {...common} value={value} onChange={(e) => onChange(e.currentTarget.value)}>
        <option value="">(default)</option>
        {(p.values ?? []).map((v) => (
          <option key={v}>{v}</option>
        ))}
      </select>
    );
  else
    input = (
      <input
        {...common}
        type={p.sensitive ? "password" : "text"}
        autoComplete="off"
        inputMode={p.type === "int" ? "numeric" : undefined}
        pattern={p.type === "int" ? "-?[0-9]{1,20}" : undefined}
        maxLength={p.maxLength ?? 65536}
        placeholder={p.type === "list" ? '["a","b"] or one value' : undefined}
        value={value}
        onInput={(e) => onChange(e.currentTarget.value)}
      />
    );
  return (
    <div class="param">
      <label for={id}>
        {p.name}
        {p.sensitive ? " (sensitive)" : ""}
      </label>
      {input}
      <small id={`${id}-hint`}>{hint}</small>
    </div>
  );
}
