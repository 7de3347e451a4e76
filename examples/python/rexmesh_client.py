#!/usr/bin/python3
"""Run a command on rexmesh hosts from Python, over gRPC with mutual TLS.

    ./generate.sh                      # stubs from proto/rexmesh/v1 into ./gen
    ./rexmesh_client.py --hosts h01,h02 -- uname -a
    ./rexmesh_client.py --all -- sh -c 'df -h / | tail -1'
    ./rexmesh_client.py --batch jobs.jsonl     # many jobs in one call (SubmitJobs)

The controller address and the operator's certificate, key and CA come from
REXMESH_CONTROLLER, REXMESH_CERT, REXMESH_KEY, REXMESH_CA (what `rexmesh dev`
prints) or from --controller, --cert, --key, --ca.

Prints every output line as `host | line` (stdout lines on stdout, stderr
lines on stderr) as it arrives, then one summary line per host. Exits 0 only
if every host succeeded, 1 otherwise (2 for usage errors). The job is
submitted and followed in one call (SubmitAndWatch).

With --batch FILE, every line of FILE is a SubmitJobRequest in protobuf
JSON; they go in one SubmitJobs call and each job's id (or why it was
refused) is printed; exits 1 if any was refused.
"""
import argparse
import os
import sys

import grpc

# The generated modules: ./gen (generate.sh's default), after anything on
# PYTHONPATH so that a freshly generated copy elsewhere takes precedence.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen"))
from google.protobuf import json_format  # noqa: E402
from rexmesh.v1 import controller_pb2, controller_pb2_grpc, task_pb2  # noqa: E402

TaskState = task_pb2.TaskState


def parse_args():
    p = argparse.ArgumentParser(description="Run a command on rexmesh hosts and stream its output.")
    env = os.environ.get
    p.add_argument("--controller", default=env("REXMESH_CONTROLLER"), help="host:port of the controller")
    p.add_argument("--cert", default=env("REXMESH_CERT"), help="operator certificate (PEM)")
    p.add_argument("--key", default=env("REXMESH_KEY"), help="operator private key (PEM)")
    p.add_argument("--ca", default=env("REXMESH_CA"), help="mesh CA certificate (PEM)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--hosts", help="comma-separated host ids")
    who.add_argument("--all", action="store_true", help="every host of your tenant")
    who.add_argument("--batch", metavar="FILE", help="submit one job per line of FILE (SubmitJobRequest in protobuf JSON)")
    p.add_argument("--timeout", type=float, default=0, help="execution timeout per host, in seconds")
    p.add_argument("command", nargs="*", help="argv to run (after --), no shell involved")
    args = p.parse_args()
    if args.batch:
        if args.command:
            p.error("--batch gives every job whole: no command")
    elif not (args.hosts or args.all):
        p.error("one of --hosts, --all or --batch is required")
    elif not args.command:
        p.error("the command to run is required (after --)")
    for name in ("controller", "cert", "key", "ca"):
        if not getattr(args, name):
            p.error(f"--{name} or REXMESH_{name.upper()} is required")
    return args


def connect(args):
    """A channel that presents the operator certificate and verifies the server against the mesh CA."""
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca), private_key=read(args.key), certificate_chain=read(args.cert))
    # gRPC checks the server certificate against the host part of the target.
    # The dev controller's certificate names IP 127.0.0.1 and DNS localhost, so
    # "127.0.0.1:PORT" verifies as is: no grpc.ssl_target_name_override needed.
    # (Set that option only to reach a server by a name its certificate lacks.)
    return grpc.secure_channel(args.controller, creds)


class LinePrinter:
    """Output arrives in chunks that may split lines; print whole lines, prefixed by host."""

    def __init__(self):
        self.partial = {}  # (host, stream) -> bytes of an unfinished line
        self.width = 0     # widest host id seen, to align the prefixes

    def write(self, host, stream, data):
        key = (host, stream)
        *lines, self.partial[key] = (self.partial.get(key, b"") + data).split(b"\n")
        for line in lines:
            self.emit(host, stream, line)

    def flush(self):
        for (host, stream), rest in self.partial.items():
            if rest:
                self.emit(host, stream, rest)
        self.partial.clear()

    def emit(self, host, stream, line):
        out = sys.stderr if stream == task_pb2.OUTPUT_STREAM_STDERR else sys.stdout
        print(f"{host:<{self.width}} | {line.decode('utf-8', 'replace')}", file=out, flush=True)


def state_name(state):
    return TaskState.Name(state).removeprefix("TASK_STATE_")


def submit_batch(args):
    """--batch FILE: every line a job; one SubmitJobs call; one line out per job."""
    request = controller_pb2.SubmitJobsRequest()
    with open(args.batch, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json_format.Parse(line, request.jobs.add())
            except json_format.ParseError as err:
                sys.stderr.write(f"rexmesh: {args.batch}:{n}: not a SubmitJobRequest: {err}\n")
                return 2
    with connect(args) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        try:
            results = stub.SubmitJobs(request).results
        except grpc.RpcError as err:
            sys.exit(f"rexmesh: {err.code().name}: {err.details()}")
    refused = 0
    for n, result in enumerate(results, 1):
        if result.code:
            refused += 1
            print(f"{n}: refused, {code_name(result.code)}: {result.message}")
        else:
            print(f"{n}: {result.response.job.id}")
    print(f"{len(results) - refused} of {len(results)} jobs submitted", file=sys.stderr)
    return 1 if refused else 0


def code_name(number):
    """The gRPC status code name of a code number (INVALID_ARGUMENT for 3)."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == number), str(number))


def main():
    args = parse_args()
    if args.batch:
        return submit_batch(args)
    with connect(args) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        request = controller_pb2.SubmitJobRequest(
            host_ids=args.hosts.split(",") if args.hosts else [],
            all_hosts=args.all,
            steps=[task_pb2.Step(name="run", exec=task_pb2.ExecTool(argv=args.command))],
        )
        if args.timeout:
            request.timeout.FromNanoseconds(int(args.timeout * 1e9))
        try:
            # SubmitAndWatch submits, then sends (as WatchJob does) a snapshot
            # of every task, all output so far, then changes; the stream ends
            # when every task has reached a final state.
            job = None
            tasks = {}  # task id -> latest Task
            printer = LinePrinter()
            for batch in stub.SubmitAndWatch(controller_pb2.SubmitAndWatchRequest(job=request)):
                if batch.HasField("job"):
                    job = batch.job
                for task in batch.tasks:
                    tasks[task.id] = task
                    printer.width = max(printer.width, len(task.host_id))
                for chunk in batch.output:
                    printer.write(tasks[chunk.task_id].host_id, chunk.stream, chunk.data)
            printer.flush()
        except grpc.RpcError as err:
            sys.exit(f"rexmesh: {err.code().name}: {err.details()}")

    # The summary: one line per host, then a total.
    ok = 0
    for task in sorted(tasks.values(), key=lambda t: t.host_id):
        ok += task.state == TaskState.TASK_STATE_SUCCEEDED
        line = f"{task.host_id:<{printer.width}}  {state_name(task.state):<11}"
        if task.signal:
            line += f"  signal {task.signal}"
        if task.HasField("exit_code"):  # proto3 `optional`: unset when no process exited
            line += f"  exit {task.exit_code}"
        elif task.message:  # why, when no process exit explains it (timeout, spawn error, ...)
            line += f"  ({task.message})"
        print(line)
    print(f"{ok} of {len(tasks)} hosts succeeded (job {job.id})")
    return 0 if ok == len(tasks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the job goes on; see it with `rexmesh jobs watch JOB_ID`
        sys.exit(130)
