import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Task } from "../../gen/rexmesh/v1/controller_pb.js";
import { JobState } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { api, background, describeError } from "./api.js";
import { Alert, Heads } from "./ui.js";
import { describeJob, isTerminal, labelQuery, RERUN_GROUPS, stateLabel, stateTone, when } from "./format.js";
import { applyBatch, emptyView, exportRows, groupOutput, histogram, toCsv, type JobView } from "./job-model.js";

/** How often the job page renders at most while batches stream in. */
const RENDER_EVERY_MS = 250;
/** Rows of the host table rendered at once; more on request. */
const ROWS_SHOWN = 500;
/** Output groups rendered at once (each different output is a group: `hostname` makes one per host); more on request. */
const GROUPS_SHOWN = 50;

/** Follows a job with WatchJob (snapshot, output so far, then live) until it ends or the page goes. */
function useJobWatch(jobId: string): { view: JobView; error: string; live: boolean } {
  const [view, setView] = useState<JobView>(emptyView);
  const [error, setError] = useState("");
  const [live, setLive] = useState(true);
  useEffect(() => {
    const abort = new AbortController();
    const decoders = new Map<string, TextDecoder>();
    let current = emptyView();
    // At most a few renders a second, however fast batches come: each one sorts, filters and groups every task.
    let shown = 0;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const show = (now = false) => {
      if (timer !== undefined) return;
      const wait = now ? 0 : Math.max(0, shown + RENDER_EVERY_MS - Date.now());
      timer = setTimeout(() => {
        timer = undefined;
        shown = Date.now();
        setView(current);
      }, wait);
    };
    (async () => {
      for await (const batch of api.watchJob({ jobId }, { signal: abort.signal })) {
        current = applyBatch(current, batch, decoders);
        show();
      }
      // The stream ends when every task is terminal; one last read has the job's final counts.
      const final = await api.getJob({ jobId }, { signal: abort.signal });
      current = applyBatch(current, { job: final.job, tasks: final.tasks, output: [] }, decoders);
      show(true);
    })()
      .catch((err: unknown) => {
        if (err instanceof ConnectError && err.code === Code.Canceled) return;
        setError(describeError(err));
      })
      .finally(() => setLive(false));
    return () => {
      abort.abort();
      clearTimeout(timer);
    };
  }, [jobId]);
  return { view, error, live };
}

/**
 * The hosts the label filter matches, asked of the controller when the
 * filter changes (after a pause in typing), not every host of the tenant
 * up front: a job page must not fetch 50,000 host records. Undefined while
 * no filter is given.
 */
function useLabelMatch(filter: string): { ids: Set<string> } | undefined {
  const [match, setMatch] = useState<{ ids: Set<string> } | undefined>(undefined);
  useEffect(() => {
    const query = labelQuery(filter);
    if (query === undefined) {
      setMatch(undefined);
      return;
    }
    if (query === null) {
      setMatch({ ids: new Set() });
      return;
    }
    const abort = new AbortController();
    const timer = setTimeout(() => {
      api.listHosts({ target: query }, { signal: abort.signal }).then(
        (r) => setMatch({ ids: new Set(r.hosts.map((h) => h.id)) }),
        () => undefined,
      );
    }, 250);
    return () => {
      clearTimeout(timer);
      abort.abort();
    };
  }, [filter]);
  return match;
}

function download(name: string, type: string, text: string) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function JobPage({ jobId }: { jobId: string }) {
  const { view, error, live } = useJobWatch(jobId);
  const [state, setState] = useState<string>("");
  const [exit, setExit] = useState("");
  const [region, setRegion] = useState("");
  const [label, setLabel] = useState("");
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [focus, setFocus] = useState<string | undefined>(undefined);
  const [mode, setMode] = useState<"groups" | "host">("groups");
  const [notice, setNotice] = useState("");
  const [actionError, setActionError] = useState("");
  const [busy, setBusy] = useState(false);
  const labelMatch = useLabelMatch(label);
  const tasks = useMemo(() => [...view.tasks.values()].sort((a, b) => a.hostId.localeCompare(b.hostId)), [view]);
  const [rowsShown, setRowsShown] = useState(ROWS_SHOWN);
  const [groupsShown, setGroupsShown] = useState(GROUPS_SHOWN);
  const regions = useMemo(() => [...new Set(tasks.map((t) => t.region).filter(Boolean))].sort(), [tasks]);
  const filtered = useMemo(() => {
    return tasks.filter((t) => {
      if (state && String(t.state) !== state) return false;
      if (exit.trim() !== "" && String(t.exitCode ?? "") !== exit.trim()) return false;
      if (region && t.region !== region) return false;
      // Until the controller's answer for this filter is in, the previous one stands.
      if (labelMatch && !labelMatch.ids.has(t.hostId)) return false;
      return true;
    });
  }, [tasks, state, exit, region, labelMatch]);
  const counts = useMemo(() => histogram(tasks), [tasks]);
  const groups = useMemo(() => groupOutput(view, filtered), [view, filtered]);
  const job = view.job;
  const running = job?.state === JobState.RUNNING;
  const max = Math.max(1, ...counts.values());

  const act = async (what: string, fn: () => Promise<string | undefined>) => {
    setBusy(true);
    setActionError("");
    setNotice("");
    try {
      const next = await fn();
      if (next) location.hash = `#/jobs/${encodeURIComponent(next)}`;
      else setNotice(`${what}: done`);
    } catch (err) {
      setActionError(`${what}: ${describeError(err)}`);
    } finally {
      setBusy(false);
    }
  };
  const rerun = (label: string, pick: { states?: TaskState[]; hostIds?: string[] }) =>
    act(`rerun ${label}`, async () => (await api.rerunJob({ jobId, states: pick.states ?? [], hostIds: pick.hostIds ?? [] })).job?.id);
  const has = (states: readonly TaskState[]) => tasks.some((t) => states.includes(t.state));
  /** The selected hosts whose task has not ended: what "Cancel selected" stops. */
  const openSelected = tasks.filter((t) => selected.has(t.hostId) && !isTerminal(t.state)).map((t) => t.hostId);
  const rows = () => exportRows(view, filtered, stateLabel);
  const focused = focus ? tasks.find((t) => t.hostId === focus) : undefined;

  return (
    <section aria-labelledby="job-h">
      <h1 id="job-h">
        Job <code>{jobId}</code> {job && <span class={`badge ${running ? "live" : "done"}`}>{running ? "running" : "done"}</span>}
      </h1>
      <Alert text={error} />
      {job && (
        <dl class="facts">
          <dt>What</dt>
          <dd class="what">{describeJob(job)}</dd>
          {Object.keys(job.parameters).length > 0 && (
            <>
              <dt>Parameters</dt>
              <dd>{Object.entries(job.parameters).map(([k, v]) => `${k}=${v}`).join(", ")}</dd>
            </>
          )}
          <dt>Submitted</dt>
          <dd>
            {when(job.createdAt)} by {job.submittedBy}
          </dd>
          <dt>Hosts</dt>
          <dd>{job.taskCount}</dd>
        </dl>
      )}
      <div class="actions" role="group" aria-label="job actions">
        <button type="button" disabled={!running || busy} onClick={() => background(act("cancel", async () => (await api.cancelJob({ jobId }), undefined)))}>
          Cancel job
        </button>
        <button
          type="button"
          disabled={!running || busy || openSelected.length === 0}
          onClick={() => background(act(`cancel on ${openSelected.length} host${openSelected.length > 1 ? "s" : ""}`, async () => (await api.cancelJob({ jobId, hostIds: openSelected }), undefined)))}
        >
          Cancel selected ({openSelected.length})
        </button>
        <button type="button" disabled={busy || !has(RERUN_GROUPS.failed)} onClick={() => background(rerun("failed hosts", { states: [...RERUN_GROUPS.failed] }))}>
          Rerun failed
        </button>
        <button type="button" disabled={busy || !has(RERUN_GROUPS.succeeded)} onClick={() => background(rerun("succeeded hosts", { states: [...RERUN_GROUPS.succeeded] }))}>
          Rerun succeeded
        </button>
        <button type="button" disabled={busy || !has(RERUN_GROUPS.undelivered)} onClick={() => background(rerun("undelivered hosts", { states: [...RERUN_GROUPS.undelivered] }))}>
          Rerun undelivered
        </button>
        <button type="button" disabled={busy || selected.size === 0} onClick={() => background(rerun("selected hosts", { hostIds: [...selected] }))}>
          Rerun selected ({selected.size})
        </button>
        <button type="button" onClick={() => download(`${jobId}.csv`, "text/csv", toCsv(rows()))}>
          Export CSV
        </button>
        <button type="button" onClick={() => download(`${jobId}.json`, "application/json", JSON.stringify({ job: job ? { id: job.id, what: describeJob(job), submittedBy: job.submittedBy } : { id: jobId }, tasks: rows() }, null, 2))}>
          Export JSON
        </button>
      </div>
      <Alert text={actionError} />
      {notice && <p role="status">{notice}</p>}

      <h2>Hosts by state</h2>
      <ul class="histogram" aria-label="hosts by state">
        {[...counts.entries()]
          .sort((a, b) => a[0] - b[0])
          .map(([s, n]) => (
            <li key={s}>
              <button type="button" class={`bar ${stateTone(s)}`} aria-pressed={state === String(s)} onClick={() => setState(state === String(s) ? "" : String(s))}>
                <span class="name">{stateLabel(s)}</span>
                <span class="fill" style={{ width: `${(100 * n) / max}%` }} />
                <span class="count">{n}</span>
              </button>
            </li>
          ))}
      </ul>

      <h2>Hosts</h2>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <label>
          State
          <select name="state" value={state} onChange={(e) => setState(e.currentTarget.value)}>
            <option value="">any</option>
            {[...counts.keys()].sort((a, b) => a - b).map((s) => (
              <option key={s} value={String(s)}>
                {stateLabel(s)}
              </option>
            ))}
          </select>
        </label>
        <label>
          Exit code
          <input name="exit" inputMode="numeric" size={5} maxLength={11} value={exit} onInput={(e) => setExit(e.currentTarget.value)} />
        </label>
        <label>
          Region
          <select value={region} onChange={(e) => setRegion(e.currentTarget.value)}>
            <option value="">any</option>
            {regions.map((r) => (
              <option key={r}>{r}</option>
            ))}
          </select>
        </label>
        <label>
          Label (key or key=value)
          <input value={label} maxLength={320} onInput={(e) => setLabel(e.currentTarget.value)} />
        </label>
      </form>
      <table class="hosts">
        <caption>
          {filtered.length} of {tasks.length} hosts{filtered.length > rowsShown ? ` (the first ${rowsShown} shown)` : ""}
          {live ? " · live" : ""}
        </caption>
        <thead>
          <tr>
            <th scope="col">
              <input
                type="checkbox"
                aria-label="select every host shown"
                checked={filtered.length > 0 && filtered.every((t) => selected.has(t.hostId))}
                onChange={(e) => setSelected(e.currentTarget.checked ? new Set(filtered.map((t) => t.hostId)) : new Set())}
              />
            </th>
            <th scope="col">Host</th>
            <th scope="col">Region</th>
            <th scope="col">Proxy</th>
            <th scope="col">State</th>
            <th scope="col">Exit</th>
            <th scope="col">Updated</th>
            <th scope="col">Message</th>
          </tr>
        </thead>
        <tbody>
          {filtered.slice(0, rowsShown).map((t: Task) => (
            <tr key={t.id} data-host={t.hostId} class={focus === t.hostId ? "focus" : undefined}>
              <td>
                <input
                  type="checkbox"
                  aria-label={`select ${t.hostId}`}
                  checked={selected.has(t.hostId)}
                  onChange={(e) => {
                    const next = new Set(selected);
                    if (e.currentTarget.checked) next.add(t.hostId);
                    else next.delete(t.hostId);
                    setSelected(next);
                  }}
                />
              </td>
              <td>
                <button type="button" class="link" onClick={() => (setFocus(t.hostId), setMode("host"))}>
                  {t.hostId}
                </button>
              </td>
              <td>{t.region}</td>
              <td>{t.proxy}</td>
              <td>
                <span class={`state ${stateTone(t.state)}`}>{stateLabel(t.state)}</span>
              </td>
              <td>{t.exitCode ?? ""}</td>
              <td>{when(t.updatedAt)}</td>
              <td class="what">{t.message}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {filtered.length > rowsShown && (
        <button type="button" onClick={() => setRowsShown(rowsShown + ROWS_SHOWN)}>
          Show {Math.min(ROWS_SHOWN, filtered.length - rowsShown)} more hosts
        </button>
      )}

      <h2>Output</h2>
      <div role="tablist" aria-label="output view" class="tabs">
        <button type="button" role="tab" aria-selected={mode === "groups"} onClick={() => setMode("groups")}>
          Grouped ({groups.length} {groups.length === 1 ? "group" : "groups"})
        </button>
        <button type="button" role="tab" aria-selected={mode === "host"} onClick={() => setMode("host")}>
          Per host{focused ? `: ${focused.hostId}` : ""}
        </button>
      </div>
      {mode === "groups" && (
        <ol class="groups">
          {groups.slice(0, groupsShown).map((g, i) => (
            <li key={i} class={i > 0 ? "differs" : undefined}>
              <p>
                <strong>{g.hosts.length}</strong> {g.hosts.length === 1 ? "host" : "hosts"} · {stateLabel(g.state)}
                {g.exitCode !== undefined ? ` · exit ${g.exitCode}` : ""}
                {i > 0 ? " · differs from the largest group" : ""}
              </p>
              <p class="hostlist">{g.hosts.join(", ")}</p>
              <OutputText out={g.out} err={g.err} />
            </li>
          ))}
        </ol>
      )}
      {mode === "groups" && groups.length > groupsShown && (
        <button type="button" onClick={() => setGroupsShown(groupsShown + GROUPS_SHOWN)}>
          Show {Math.min(GROUPS_SHOWN, groups.length - groupsShown)} more groups (of {groups.length - groupsShown} not shown)
        </button>
      )}
      {mode === "host" && (focused ? <OutputText label={`output of ${focused.hostId}`} out={view.output.get(focused.id)?.out ?? ""} err={view.output.get(focused.id)?.err ?? ""} live={!isTerminal(focused.state)} /> : <p>Choose a host in the table.</p>)}
    </section>
  );
}

function OutputText({ out, err, label, live }: { out: string; err: string; label?: string; live?: boolean }) {
  const ref = useRef<HTMLPreElement>(null);
  useEffect(() => {
    if (live && ref.current) ref.current.scrollTop = ref.current.scrollHeight;
  }, [out, err, live]);
  return (
    <pre class="output" ref={ref} tabIndex={0} aria-label={label ?? "output"} aria-live={live ? "polite" : undefined} data-testid="output">
      {out}
      {err && <span class="stderr">{err}</span>}
      {!out && !err && <span class="none">(no output)</span>}
    </pre>
  );
}
