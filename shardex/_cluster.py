"""Where work runs on a cluster, and what each node ran: the Ray-free half of the Ray layer.

`_ray` asks Ray for the nodes and ships tasks; this module decides which node gets each task
(`Placer`), holds the probe every node runs before any work (`probe_node`), and turns what ran
where (`TaskRecord`) into the trace and the per-node summary an export reports. Nothing here
imports ray, so each piece runs in-process in unit tests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from importlib import metadata

from shardex._errors import OptionsError

# Packages whose version changes the exported bytes: workers must run the coordinator's.
PINNED_PACKAGES = ("shardex", "torch", "onnxscript", "onnx-ir")
SHARED_FS_FIX = (
    "put the output directory (and the source) on a filesystem every node mounts at the same path "
    "(NFS, a shared volume); see cluster/README.md"
)
MARKER_PREFIX = ".shardex-probe-"  # the storage probe's files in an output directory
INSTALL_FIX = (
    "install shardex on every node (in the cluster image, or with ray.init's runtime_env "
    "'pip' or 'py_modules'); see cluster/README.md"
)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """An alive Ray node and the resources it offers."""

    node_id: str
    address: str
    cpus: float
    gpus: float

    def __str__(self) -> str:
        return f"{self.address} (node {self.node_id[:8]})"


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """Where and when one task ran: the node, the worker process, and wall-clock start and end
    (seconds since the epoch, read on the worker: nodes' clocks are as close as NTP keeps them)."""

    label: str
    node_id: str
    hostname: str
    address: str
    pid: int
    start: float
    end: float
    cpus: float
    gpus: float

    @property
    def stage(self) -> str:
        """The label's first word: capture, write, verify."""
        return self.label.split()[0]


IO_TASKS_PER_SLOT = 2
COORDINATOR = "coordinator"  # the node id of work run by the coordinator's own threads


def coordinator_record(label: str, start: float, end: float, pid: int | None = None) -> TaskRecord:
    """The record of work the coordinator ran itself (not a Ray task): its node is the
    coordinator, its worker the thread (a Linux thread id, in the PID space) or `pid`, a
    process it forked."""
    pid = threading.get_native_id() if pid is None else pid
    return TaskRecord(label, COORDINATOR, socket.gethostname(), "local", pid, start, end, 0, 0)


class Placer:
    """Chooses the node of each task, so that work spreads over the cluster.

    A node has ``CPUs // cpus_per_task`` slots. A task goes to the node with the fewest running
    tasks of its kind per slot, ties to the node given the fewest tasks so far, so even a single
    worker alternates between nodes. CPU tasks and I/O tasks (which take no CPU) are counted
    apart, each kind bounded by `max_in_flight` (default: every slot of the cluster). Ray's own
    SPREAD strategy does not do this: it reuses a finished task's worker for the next task, so
    short tasks pile onto one node, and it cannot say in advance whether the node has a GPU.
    """

    def __init__(self, nodes: Sequence[NodeInfo], *, cpus_per_task: float, max_in_flight: int | None) -> None:
        if cpus_per_task <= 0:
            raise OptionsError(f"cpus_per_task must be greater than 0, got {cpus_per_task}.")
        usable = [n for n in nodes if n.cpus >= cpus_per_task]
        if not usable:
            largest = max((n.cpus for n in nodes), default=0)
            raise OptionsError(
                f"no Ray node has {cpus_per_task} CPUs for a task (largest: {largest:g}); "
                "lower cpus_per_task or add bigger nodes."
            )
        self.nodes = {n.node_id: n for n in usable}
        self.slots = {n.node_id: int(n.cpus // cpus_per_task) for n in usable}
        self.limit = max_in_flight or sum(self.slots.values())
        self.running = {False: collections.Counter(), True: collections.Counter()}
        self.given: collections.Counter = collections.Counter()

    def take(self, io_bound: bool) -> NodeInfo | None:
        """The node for the next task of this kind, or None while that kind is at its limit.
        I/O tasks get `IO_TASKS_PER_SLOT` per slot: each spends part of its time waiting on
        fsync, when another can use the CPU."""
        running = self.running[io_bound]
        per_slot = IO_TASKS_PER_SLOT if io_bound else 1
        if sum(running.values()) >= self.limit * per_slot:
            return None
        free = [i for i, slots in self.slots.items() if running[i] < slots * per_slot]
        if not free:
            return None
        chosen = min(free, key=lambda i: (running[i] / self.slots[i], self.given[i]))
        running[chosen] += 1
        self.given[chosen] += 1
        return self.nodes[chosen]

    def release(self, node: NodeInfo, io_bound: bool) -> None:
        self.running[io_bound][node.node_id] -= 1

    def gpus_for(self, node: NodeInfo) -> float:
        """A GPU task's share of its node's GPUs, so that all the node's slots can run GPU tasks
        at once; none on a node without GPUs. Ray takes shares in steps of 0.0001."""
        return min(1.0, math.floor(node.gpus / self.slots[node.node_id] * 1e4) / 1e4)


@contextlib.contextmanager
def marker_file(directory: str) -> Iterator[str]:
    """A uniquely named hidden file in `directory` for the block's duration: a node that sees it
    sees the coordinator's directory, not a node-local one of the same name."""
    name = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(name)
    try:
        yield name
    finally:
        os.remove(path)


@dataclasses.dataclass(frozen=True)
class NodeProbe:
    """What one node found: the first problem with the output directory or the source (None
    when all is well), and its versions of the pinned packages."""

    hostname: str
    problem: str | None
    versions: dict[str, str]


def probe_node(directory: str, marker: str, readable: Sequence[str]) -> NodeProbe:
    """Run on each node before any work: does `directory` exist here, hold the coordinator's
    `marker`, accept a new file, and are the `readable` (source) files readable here?"""
    return NodeProbe(socket.gethostname(), _storage_problem(directory, marker, readable), package_versions())


def _storage_problem(directory: str, marker: str, readable: Sequence[str]) -> str | None:
    if not os.path.isdir(directory):
        return f"output directory {directory} does not exist"
    if not os.path.exists(os.path.join(directory, marker)):
        return f"output directory {directory} is another directory than the coordinator's (its file {marker} is missing)"
    scratch = os.path.join(directory, f"{marker}-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(scratch, "x") as f:
            f.write("probe")
        os.remove(scratch)
    except OSError as e:
        return f"output directory {directory} is not writable ({e.strerror})"
    for path in readable:
        try:
            with open(path, "rb"):  # opening, not os.access: root-squashed NFS answers access() wrongly
                pass
        except OSError:
            return f"source file {path} is not readable"
    return None


def package_versions() -> dict[str, str]:
    """Release versions of the pinned packages (local tags such as ``+cpu`` dropped: a GPU node's
    CUDA build of torch is the same release as a CPU build)."""
    versions = {}
    for name in PINNED_PACKAGES:
        try:
            versions[name] = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def probe_error(node: NodeInfo, probe: NodeProbe, expected: dict[str, str]) -> str | None:
    """The one-line error for a node whose probe found a problem or other package versions."""
    where = f"on Ray node {probe.hostname} {node}"
    if probe.problem:
        return f"{where}: {probe.problem}; {SHARED_FS_FIX}."
    differ = [
        f"{name} {probe.versions.get(name)} (here {v})"
        for name, v in expected.items()
        if probe.versions.get(name) != v
    ]
    if differ:
        return f"{where}: {', '.join(differ)}; {INSTALL_FIX}, with this machine's versions."
    return None


def summarize_nodes(records: Sequence[TaskRecord]) -> list[dict]:
    """Per node: tasks run, busy seconds and tasks per stage, in order of first task."""
    nodes: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r.start):
        node = nodes.setdefault(
            r.node_id,
            {
                "node_id": r.node_id,
                "hostname": r.hostname,
                "address": r.address,
                "tasks": 0,
                "busy_seconds": 0.0,
                "stages": {},
            },
        )
        node["tasks"] += 1
        node["busy_seconds"] += r.end - r.start
        node["stages"][r.stage] = node["stages"].get(r.stage, 0) + 1
    return list(nodes.values())


def write_timeline(records: Sequence[TaskRecord], path: str) -> None:
    """Write `records` as a Chrome trace (open in https://ui.perfetto.dev or chrome://tracing):
    one process row per node, one thread row per worker process, one span per task, times in
    microseconds from the first task's start. Written atomically."""
    ordered = sorted(records, key=lambda r: r.start)
    t0 = ordered[0].start if ordered else 0.0
    nodes = summarize_nodes(ordered)
    rows = {node["node_id"]: i for i, node in enumerate(nodes, start=1)}
    events: list[dict] = []
    for node in nodes:
        row = rows[node["node_id"]]
        name = (
            f"coordinator ({node['hostname']})"
            if node["node_id"] == COORDINATOR
            else f"node {node['address']} {node['node_id'][:8]} ({node['hostname']})"
        )
        events.append({"ph": "M", "name": "process_name", "pid": row, "tid": 0, "args": {"name": name}})
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": row, "tid": 0, "args": {"sort_index": row}}
        )
    for pid, worker in dict.fromkeys((rows[r.node_id], r.pid) for r in ordered):
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pid,
                "tid": worker,
                "args": {"name": f"worker {worker}"},
            }
        )
    for r in ordered:
        events.append(
            {
                "ph": "X",
                "name": r.label,
                "cat": r.stage,
                "pid": rows[r.node_id],
                "tid": r.pid,
                "ts": round((r.start - t0) * 1e6),
                "dur": round((r.end - r.start) * 1e6),
                "args": {"node_id": r.node_id, "cpus": r.cpus, "gpus": r.gpus},
            }
        )
    from shardex._output import write_atomic  # coordinator-only; _output imports this module

    write_atomic(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
