import { useMemo, useState } from "preact/hooks";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { JobState, type Job } from "../../gen/rexmesh/v1/controller_pb.js";
import { api } from "./api.js";
import { Alert, Heads, usePolled } from "./ui.js";
import { describeJob, stateLabel, when } from "./format.js";

const SINCE: Record<string, number> = { "1h": 3_600_000, "24h": 86_400_000, "7d": 7 * 86_400_000, all: Infinity };

/** The tenant's newest jobs the operator may read, filtered here. */
export function JobsPage() {
  const { value: jobs, error } = usePolled<Job[]>(async () => (await api.listJobs({ limit: 500 })).jobs, [], 3000);
  const [state, setState] = useState("");
  const [operator, setOperator] = useState("");
  const [doc, setDoc] = useState("");
  const [since, setSince] = useState("all");
  const shown = useMemo(() => {
    const after = Date.now() - (SINCE[since] ?? Infinity);
    return jobs.filter(
      (j) =>
        (!state || (state === "running" ? j.state === JobState.RUNNING : j.state === JobState.DONE)) &&
        (!operator || j.submittedBy.toLowerCase().includes(operator.toLowerCase())) &&
        (!doc || describeJob(j).toLowerCase().includes(doc.toLowerCase())) &&
        (!j.createdAt || timestampDate(j.createdAt).getTime() >= after),
    );
  }, [jobs, state, operator, doc, since]);
  return (
    <section aria-labelledby="jobs-h">
      <h1 id="jobs-h">Jobs</h1>
      <Alert text={error} />
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <label>
          State
          <select value={state} onChange={(e) => setState(e.currentTarget.value)}>
            <option value="">any</option>
            <option value="running">running</option>
            <option value="done">done</option>
          </select>
        </label>
        <label>
          Operator
          <input value={operator} maxLength={200} onInput={(e) => setOperator(e.currentTarget.value)} />
        </label>
        <label>
          Document or command
          <input value={doc} maxLength={200} onInput={(e) => setDoc(e.currentTarget.value)} />
        </label>
        <label>
          Submitted
          <select value={since} onChange={(e) => setSince(e.currentTarget.value)}>
            <option value="1h">last hour</option>
            <option value="24h">last 24 hours</option>
            <option value="7d">last 7 days</option>
            <option value="all">any time</option>
          </select>
        </label>
      </form>
      <table>
        <caption>{shown.length} of {jobs.length} jobs</caption>
        <Heads cols={["Job", "Submitted", "By", "What", "State", "Hosts"]} />
        <tbody>
          {shown.map((j) => (
            <tr key={j.id}>
              <td><a href={`#/jobs/${encodeURIComponent(j.id)}`}>{j.id}</a></td>
              <td>{when(j.createdAt)}</td>
              <td>{j.submittedBy}</td>
              <td class="what">{describeJob(j)}</td>
              <td>{j.state === JobState.RUNNING ? "running" : "done"}</td>
              <td>{j.counts.map((c) => `${c.count} ${stateLabel(c.state)}`).join(", ")}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
