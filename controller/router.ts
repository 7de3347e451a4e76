import type { Logger } from "../common/logger.js";
import { isTerminal } from "../common/task-state.js";
import { TaskState, type TaskSpec, type TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import type { SignedSessionOrder } from "../gen/rexmesh/v1/session_pb.js";
import type { Inventory } from "./inventory.js";
import type { JobStore } from "./job-store.js";
import type { HostRecord, JobRecord, Recall, TaskRecord } from "./model.js";

/** What the controller needs of a connected proxy. */
export interface ProxyPort {
  readonly name: string;
  readonly region: string;
  sendTask(spec: TaskSpec): void;
  /** `withdraw`: stop the task only if it has not started. */
  sendCancel(taskId: string, hostId: string, withdraw?: boolean): void;
  /** Asks the proxy to open a session with a host it holds (docs/sessions.md); absent where a link carries no sessions. */
  openSession?(order: SignedSessionOrder): void;
}

export interface RouterOptions {
  inventory: Inventory;
  store: JobStore;
  log: Logger;
  now: () => number;
  /** The job of a task (for its spec and cancel flag). */
  jobOf: (task: TaskRecord) => JobRecord | undefined;
  /** The signed-to-be spec of a task. */
  specOf: (job: JobRecord, task: TaskRecord) => TaskSpec;
  /** Stores a task record (its holders changed); resolves once durable. */
  write: (task: TaskRecord) => Promise<void>;
}

/** The holder name of a region served by bundles. */
export const bundleHolder = (region: string): string => `bundle:${region}`;

/**
 * Which proxy holds which task. A task goes to the proxy that holds its
 * host's stream; when the host moves to another proxy of its region (a
 * failover), its tasks not yet delivered go there too, so it may be held by
 * several proxies at once — the daemon's ledger runs it once whichever copy
 * arrives first. Every holder is stored on the task before the task is sent
 * to it (a restarted controller still knows who may have it), and a holder
 * leaves the list when it reports the task ended at its end.
 *
 * The router also decides which proxy may report on a task: one that holds
 * it, or holds its host's stream now (a host brings its running tasks with
 * it when it fails over).
 */
export class Router {
  private readonly opts: RouterOptions;
  private readonly proxies = new Map<string, ProxyPort>();
  /** Open (non-terminal) live tasks per host. */
  private readonly byHost = new Map<string, Set<string>>();
  private readonly tasks = new Map<string, TaskRecord>();
  /** Tasks already sent on a link (one ProxyPort per stream), so a reconnect does not send them twice on it. */
  private readonly sentOn = new WeakMap<ProxyPort, Set<string>>();
  /** Tasks of a job being submitted, given their proxy but not sent yet (see sendRouted). */
  private readonly unsent = new Set<string>();
  /**
   * Cancels owed (recalls), per host and then per task: a host that returns
   * through a proxy other than the one owed the cancel is told by that one.
   */
  private readonly recallsByHost = new Map<string, Map<string, Recall[]>>();

  constructor(opts: RouterOptions) {
    this.opts = opts;
    for (const r of opts.store.allRecalls()) this.indexRecall(r);
  }

  // ---- the index of open tasks ------------------------------------------

  track(task: TaskRecord): void {
    if (isTerminal(task.state)) return;
    this.tasks.set(task.id, task);
    let set = this.byHost.get(task.hostId);
    if (!set) this.byHost.set(task.hostId, (set = new Set()));
    set.add(task.id);
  }

  untrack(task: TaskRecord): void {
    this.tasks.delete(task.id);
    const set = this.byHost.get(task.hostId);
    if (!set) return;
    set.delete(task.id);
    if (set.size === 0) this.byHost.delete(task.hostId);
  }

  /** Open tasks per host, for the bounds sweep. */
  openByHost(): ReadonlyMap<string, ReadonlySet<string>> {
    return this.byHost;
  }

  openTask(id: string): TaskRecord | undefined {
    return this.tasks.get(id);
  }

  // ---- proxies and hosts ---------------------------------------------------

  port(name: string): ProxyPort | undefined {
    return this.proxies.get(name);
  }

  proxyConnected(port: ProxyPort): void {
    const prev = this.proxies.get(port.name);
    this.proxies.set(port.name, port);
    if (prev && prev !== port) this.opts.log.info("proxy link replaced", { proxy: port.name });
  }

  proxyDisconnected(port: ProxyPort): void {
    if (this.proxies.get(port.name) !== port) return;
    this.proxies.delete(port.name);
    this.opts.inventory.proxyLost(port.name, this.opts.now());
  }

  /** The host has a stream at a proxy whose link to the controller is up. */
  reachable(host: HostRecord | undefined): boolean {
    return host !== undefined && host.connected && this.proxies.has(host.proxy);
  }

  /**
   * A proxy (re)connected and told us the hosts it holds: what it may hold
   * but never confirmed goes to it again (it drops duplicates), then the
   * cancels it is owed — durable ones for tasks the controller ended itself,
   * and those of jobs being cancelled.
   */
  proxyReady(port: ProxyPort): void {
    for (const task of this.tasks.values()) {
      if (!task.proxies?.includes(port.name)) continue;
      const job = this.opts.jobOf(task);
      if (!job) continue;
      if (task.state < TaskState.DELIVERED && !task.confirmed?.includes(port.name)) this.send(port, job, task);
      if (job.cancelRequested) port.sendCancel(task.id, task.hostId);
    }
    for (const r of this.opts.store.recallsFor(port.name)) port.sendCancel(r.taskId, r.hostId, r.withdraw);
  }

  /**
   * A host's stream opened at a proxy. Its pending tasks can go now; tasks
   * that other proxies hold but have not handed over yet go to this one too
   * (the host failed over, and may never return to the old one). Tasks the
   * host already has need nothing: it reports them through its new proxy.
   */
  hostConnected(host: HostRecord): void {
    const ids = this.byHost.get(host.id);
    const port = this.proxies.get(host.proxy);
    if (!port) return;
    // Tasks the controller ended while the host was away (it may still run them): the proxy it came back through tells it.
    for (const recalls of this.recallsByHost.get(host.id)?.values() ?? []) {
      const r = recalls[0]!;
      if (!recalls.some((x) => x.proxy === port.name)) port.sendCancel(r.taskId, r.hostId, recalls.every((x) => x.withdraw));
    }
    if (!ids) return;
    for (const id of ids) {
      const task = this.tasks.get(id);
      if (!task) continue;
      const job = this.opts.jobOf(task);
      if (!job) continue;
      if (job.cancelRequested) {
        if (task.proxies?.length) port.sendCancel(task.id, task.hostId);
        continue;
      }
      if (task.state < TaskState.DELIVERED) this.route(task, job);
    }
  }

  /**
   * Sends a task not yet delivered to the proxy holding its host's stream,
   * if that proxy is connected and may not have it: the proxy is stored as a
   * holder first, and the task sent once that is durable. Pending tasks must
   * be released; nothing goes out for a cancelled job or past the deadline.
   */
  route(task: TaskRecord, knownJob?: JobRecord): void {
    if (isTerminal(task.state) || task.state >= TaskState.DELIVERED || task.released === false || task.rejectAtSubmit !== undefined) return;
    const host = this.opts.inventory.get(task.hostId);
    if (!this.reachable(host)) return;
    const job = knownJob ?? this.opts.jobOf(task);
    if (!job || job.cancelRequested || this.opts.now() >= job.deliverBy) return;
    const name = host!.proxy;
    if (task.proxies?.includes(name)) {
      const port = this.proxies.get(name)!;
      if (!task.confirmed?.includes(name)) this.send(port, job, task);
      return;
    }
    task.proxies = [...(task.proxies ?? []), name];
    this.opts.write(task).then(
      () => {
        const port = this.proxies.get(name);
        if (port && !isTerminal(task.state)) this.send(port, job, task);
      },
      (err) => this.opts.log.error("routing a task failed", { task: task.id, err }),
    );
  }

  /** Marks, before the first write of a new job, the proxy each task will go to (see {@link sendRouted}). */
  preRoute(task: TaskRecord, job: JobRecord): void {
    if (task.released === false || task.rejectAtSubmit !== undefined) return;
    const host = this.opts.inventory.get(task.hostId);
    if (!this.reachable(host) || this.opts.now() >= job.deliverBy) return;
    task.proxies = [host!.proxy];
    this.unsent.add(task.id);
  }

  /** Sends a task marked by {@link preRoute}, once the job is stored (a cancel in between takes it back). */
  sendRouted(task: TaskRecord, job: JobRecord): void {
    if (!this.unsent.delete(task.id)) return;
    const name = task.proxies?.[0];
    const port = name === undefined ? undefined : this.proxies.get(name);
    if (!port || task.state !== TaskState.PENDING || job.cancelRequested) return;
    this.send(port, job, task);
  }

  /**
   * Takes back a task given its proxy at submit but not sent yet: it is no
   * longer held by anyone (the caller ends it). False when it may have left.
   */
  takeBack(task: TaskRecord): boolean {
    if (!this.unsent.delete(task.id)) return false;
    task.proxies = [];
    return true;
  }

  private send(port: ProxyPort, job: JobRecord, task: TaskRecord): void {
    let sent = this.sentOn.get(port);
    if (!sent) this.sentOn.set(port, (sent = new Set()));
    if (sent.has(task.id)) return;
    sent.add(task.id);
    port.sendTask(this.opts.specOf(job, task));
  }

  // ---- reports from proxies ------------------------------------------------

  /**
   * May this proxy report on the task? Only one that holds it (it was sent
   * the task, or has reported on it before), or a site's proxy for a task
   * exported to its region by bundle, or one that held the task's host at
   * some time since the task's job was created (a host brings its tasks
   * with it when it fails over, and the proxy it reached may pass them on
   * much later, after a cut). Anything else is held back, not taken.
   */
  mayReport(proxy: { name: string; region: string }, task: TaskRecord): boolean {
    if (task.proxies?.includes(proxy.name) || task.proxies?.includes(bundleHolder(proxy.region))) return true;
    const host = this.opts.inventory.get(task.hostId);
    if (!host || host.region !== proxy.region) return false;
    const until = host.heldUntil?.[proxy.name];
    if (until === undefined) return false;
    if (until === 0) return true;
    const job = this.opts.jobOf(task);
    return job !== undefined && until >= job.createdAt;
  }

  /**
   * Notes what a report says about who holds the task; returns true when the
   * task's record changed (it must be written). A proxy that reports is a
   * holder; one that ended its own copy (a status marked at_proxy) no longer
   * is. The cancel it was owed is settled once it reports an end.
   */
  reported(proxy: { name: string; region: string }, task: TaskRecord, status?: TaskStatus): boolean {
    let changed = false;
    const name = proxy.name;
    if (status?.atProxy && isTerminal(status.state)) {
      const before = task.proxies?.length ?? 0;
      task.proxies = task.proxies?.filter((p) => p !== name && p !== bundleHolder(proxy.region));
      task.confirmed = task.confirmed?.filter((p) => p !== name);
      changed = (task.proxies?.length ?? 0) !== before;
    } else {
      if (!task.proxies?.includes(name)) {
        task.proxies = [...(task.proxies ?? []), name];
        changed = true;
      }
      if (!task.confirmed?.includes(name)) {
        task.confirmed = [...(task.confirmed ?? []), name];
        changed = true;
      }
    }
    if (status && isTerminal(status.state)) {
      // A proxy's own copy ended settles what that proxy was owed; the host's own end settles every
      // cancel owed for the task (the host's ledger answers any copy still on its way). The index
      // knows every recall stored, so nothing is removed that was never owed.
      const own = [name, bundleHolder(proxy.region)];
      const settled = this.unindexRecalls(task, (r) => !status.atProxy || own.includes(r.proxy));
      for (const r of settled) void this.opts.store.removeRecall(r.proxy, task.id).catch((err) => this.opts.log.error("settling a recall failed", { task: task.id, err }));
    }
    return changed;
  }

  private indexRecall(r: Recall): void {
    let tasks = this.recallsByHost.get(r.hostId);
    if (!tasks) this.recallsByHost.set(r.hostId, (tasks = new Map()));
    const list = (tasks.get(r.taskId) ?? []).filter((x) => x.proxy !== r.proxy);
    tasks.set(r.taskId, [...list, r]);
  }

  /** Takes the task's recalls that `settles` out of the index; returns them. */
  private unindexRecalls(task: TaskRecord, settles: (r: Recall) => boolean): Recall[] {
    const tasks = this.recallsByHost.get(task.hostId);
    const list = tasks?.get(task.id);
    if (!tasks || !list) return [];
    const left = list.filter((r) => !settles(r));
    if (left.length > 0) tasks.set(task.id, left);
    else tasks.delete(task.id);
    if (tasks.size === 0) this.recallsByHost.delete(task.hostId);
    return list.filter(settles);
  }


  // ---- cancels ---------------------------------------------------------------

  /** Every proxy that may hold the task. */
  holders(task: TaskRecord): string[] {
    return [...(task.proxies ?? [])];
  }

  /**
   * Every proxy that may hold the task or its host: its holders, and the
   * proxy that holds the host's stream now (a host that failed over brings
   * its running tasks with it, maybe before its new proxy reported on them).
   */
  private cancelTargets(task: TaskRecord): string[] {
    const names = this.holders(task);
    const host = this.opts.inventory.get(task.hostId);
    if (host?.connected && host.proxy && !names.includes(host.proxy)) names.push(host.proxy);
    return names;
  }

  /** Asks every connected holder, and the host's proxy, to cancel the task (not stored: see {@link recall}). */
  cancel(task: TaskRecord, withdraw = false): void {
    for (const name of this.cancelTargets(task)) this.proxies.get(name)?.sendCancel(task.id, task.hostId, withdraw);
  }

  /**
   * The controller ended a task itself: every holder is owed a cancel, kept
   * until it reports the task ended at its end, so that a proxy or host that
   * comes back is told. Resolves once stored.
   */
  recall(task: TaskRecord, withdraw: boolean): Promise<void> {
    const holders = this.holders(task);
    if (holders.length === 0) return Promise.resolve();
    const at = this.opts.now();
    const recalls: Recall[] = holders.map((proxy) => ({ proxy, taskId: task.id, hostId: task.hostId, withdraw, at }));
    for (const r of recalls) this.indexRecall(r);
    this.cancel(task, withdraw);
    return this.opts.store.putRecalls(recalls);
  }
}
