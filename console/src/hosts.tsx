import { useEffect, useState } from "preact/hooks";
import { ConnectionState, type Host, type HostTask } from "../../gen/rexmesh/v1/controller_pb.js";
import { api, background, describeError } from "./api.js";
import { stateLabel, stateTone, when } from "./format.js";

const CONNECTION: Record<number, string> = {
  [ConnectionState.CONNECTED]: "connected",
  [ConnectionState.DISCONNECTED]: "disconnected",
  [ConnectionState.REVOKED]: "revoked",
};

const labelsOf = (h: Host) => Object.entries(h.labels).map(([k, v]) => `${k}=${v}`).join(" ");

/** Every host the operator may read; the filter is the API's own host query. */
export function HostsPage() {
  const [hosts, setHosts] = useState<Host[]>([]);
  const [query, setQuery] = useState("");
  const [applied, setApplied] = useState("");
  const [error, setError] = useState("");
  useEffect(() => {
    let stop = false;
    const load = () =>
      api.listHosts({ target: applied }).then(
        (r) => !stop && (setHosts(r.hosts.sort((a, b) => a.id.localeCompare(b.id))), setError("")),
        (err: unknown) => !stop && setError(describeError(err)),
      );
    background(load());
    const t = setInterval(() => background(load()), 5000);
    return () => {
      stop = true;
      clearInterval(t);
    };
  }, [applied]);
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
      {error && <p role="alert" class="error">{error}</p>}
      <table class="hosts">
        <caption>
          {hosts.length} hosts, {connected} connected
        </caption>
        <thead>
          <tr>
            <th scope="col">Host</th>
            <th scope="col">Connection</th>
            <th scope="col">Since</th>
            <th scope="col">Region</th>
            <th scope="col">Proxy</th>
            <th scope="col">Version</th>
            <th scope="col">OS</th>
            <th scope="col">Labels</th>
          </tr>
        </thead>
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
      {error && <p role="alert" class="error">{error}</p>}
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
        <thead>
          <tr>
            <th scope="col">Job</th>
            <th scope="col">Submitted</th>
            <th scope="col">By</th>
            <th scope="col">What</th>
            <th scope="col">State</th>
            <th scope="col">Exit</th>
          </tr>
        </thead>
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
