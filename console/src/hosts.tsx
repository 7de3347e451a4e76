import { useEffect, useState } from "preact/hooks";
import { ConnectionState, type Host, type HostTask } from "../../gen/rexmesh/v1/controller_pb.js";
import { api, describeError } from "./api.js";
import { Alert, Heads, usePolled } from "./ui.js";
import { stateLabel, stateTone, when } from "./format.js";

const CONNECTION: Record<number, string> = {
  [ConnectionState.CONNECTED]: "connected",
  [ConnectionState.DISCONNECTED]: "disconnected",
  [ConnectionState.REVOKED]: "revoked",
};

const labelsOf = (h: Host) => Object.entries(h.labels).map(([k, v]) => `${k}=${v}`).join(" ");

/** Every host the operator may read; the filter is the API's own host query. */
export function HostsPage() {
  const [query, setQuery] = useState("");
  const [applied, setApplied] = useState("");
  const { value: hosts, error } = usePolled<Host[]>(async () => (await api.listHosts({ target: applied })).hosts.sort((a, b) => a.id.localeCompare(b.id)), [], 5000, applied);
  const connected = hosts.filter((h) => h.connection === ConnectionState.CONNECTED).length;
  return (
    <section aria-labelledby="hosts-h">
      <h1 id="hosts-h">Hosts</h1>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          setApplied(query.trim());
        }}
      >
        <label>
          Host query
          <input value={query} size={40} maxLength={4096} placeholder="role=web and region=eu-west" onInput={(e) => setQuery(e.currentTarget.value)} />
        </label>
        <button type="submit">Filter</button>
      </form>
      <Alert text={error} />
      <table class="hosts">
        <caption>
          {hosts.length} hosts, {connected} connected
        </caption>
        <Heads cols={["Host", "Connection", "Since", "Region", "Proxy", "Version", "OS", "Labels"]} />
        <tbody>
          {hosts.map((h) => (
            <tr key={h.id}>
              <td>
                <a href={`#/hosts/${encodeURIComponent(h.id)}`}>{h.id}</a>
              </td>
              <td>
                <span class={`state ${h.connection === ConnectionState.CONNECTED ? "ok" : h.connection === ConnectionState.REVOKED ? "bad" : "warn"}`}>{CONNECTION[h.connection] ?? "unknown"}</span>
              </td>
              <td>{when(h.since)}</td>
              <td>{h.region}</td>
              <td>{h.proxy}</td>
              <td>{h.facts?.daemonVersion}</td>
              <td>{[h.facts?.os, h.facts?.arch].filter(Boolean).join(" ")}</td>
              <td>{labelsOf(h)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

/** One host: its facts and labels, and its recent tasks (ListHostTasks). */
export function HostPage({ hostId }: { hostId: string }) {
  const [host, setHost] = useState<Host | undefined>(undefined);
  const [tasks, setTasks] = useState<HostTask[]>([]);
  const [error, setError] = useState("");
  useEffect(() => {
    api
      .listHosts({ target: `#${hostId}` })
      .then((r) => setHost(r.hosts[0]))
      .then(() => api.listHostTasks({ hostId, pageSize: 50 }))
      .then((r) => setTasks(r.tasks))
      .catch((err: unknown) => setError(describeError(err)));
  }, [hostId]);
  const f = host?.facts;
  return (
    <section aria-labelledby="host-h">
      <h1 id="host-h">
        Host <code>{hostId}</code>
      </h1>
      <Alert text={error} />
      {host && (
        <dl class="facts">
          <dt>Connection</dt>
          <dd>
            {CONNECTION[host.connection] ?? "unknown"} since {when(host.since)}
            {host.revokedReason ? ` (${host.revokedReason})` : ""}
          </dd>
          <dt>Region / proxy</dt>
          <dd>
            {host.region} / {host.proxy}
          </dd>
          <dt>Labels</dt>
          <dd>{labelsOf(host) || "none"}</dd>
          <dt>Facts</dt>
          <dd>
            {f && `${f.os} ${f.osFamily} ${f.arch}, kernel ${f.kernel}, hostname ${f.hostname}, addresses ${f.addresses.join(" ")}, daemon ${f.daemonVersion}, tools ${f.tools.join(" ")}`}
          </dd>
        </dl>
      )}
      <h2>Recent tasks</h2>
      <table>
        <Heads cols={["Job", "Submitted", "By", "What", "State", "Exit"]} />
        <tbody>
          {tasks.map((t) => (
            <tr key={t.task?.id}>
              <td>
                <a href={`#/jobs/${encodeURIComponent(t.task?.jobId ?? "")}`}>{t.task?.jobId}</a>
              </td>
              <td>{when(t.createdAt)}</td>
              <td>{t.submittedBy}</td>
              <td class="what">{t.what}</td>
              <td>{t.task && <span class={`state ${stateTone(t.task.state)}`}>{stateLabel(t.task.state)}</span>}</td>
              <td>{t.task?.exitCode ?? ""}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
