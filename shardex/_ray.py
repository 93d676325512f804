"""The Ray layer, the only module that imports ray.

Stage functions stay plain Python (each runs in-process in unit tests); this module ships them
to Ray workers as tasks, places each task on a node (`_cluster.Placer`), bounds how many run at
once, records where each ran, and turns a worker's failure back into the stage's own one-line
error. On a cluster it also checks, before any work, that every node sees the output directory.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from shardex._cluster import (
    INSTALL_FIX,
    NodeInfo,
    Placer,
    TaskRecord,
    coordinator_record,
    marker_file,
    package_versions,
    probe_error,
    probe_node,
)
from shardex._errors import OptionsError, ShardexError

logger = logging.getLogger("shardex")

LOCAL = "local"  # `address`: start a local Ray and run every stage on its workers
TASK_RETRIES = 2  # a task whose worker process dies is rerun this many times
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"
TOKEN_PLACES = (
    "the cluster's token in RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH "
    f"(default {DEFAULT_TOKEN_PATH})"
)

# Set inside `RaySession.checks()` on a machine of its own: `run_tasks` runs tasks here.
_RUN_HERE: contextvars.ContextVar[bool] = contextvars.ContextVar("shardex_run_here", default=False)

# The lists `recording()` blocks collect into, innermost last.
_RECORDINGS: contextvars.ContextVar[tuple[list[TaskRecord], ...]] = contextvars.ContextVar(
    "shardex_recordings", default=()
)


def worker_runtime_env() -> dict:
    """Environment for workers of a Ray started here: the driver's import path, so the package
    (even from a source checkout) and factory modules import the same way on workers."""
    paths = [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))}}


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    lazy: bool = False,
    on_start: Callable[[], None] | None = None,
) -> Iterator[RaySession]:
    """Use the Ray already initialized in this process, join `address` / ``RAY_ADDRESS``, or
    start a local Ray for the duration of the block (and stop it after).

    With `lazy`, a local Ray is started only when a stage asks for it (`RaySession.ensure`,
    `RaySession.start_soon`): an export whose pieces all come from the capture cache and that
    is not verified needs none. A cluster to join, or a Ray already initialized, is used at once.
    `on_start` runs once Ray is up (e.g. to warm workers up).

    A joined cluster's workers import shardex from their own environment (the driver's import
    path is not shipped): `runtime_env` (e.g. ``{"pip": [...]}`` or ``{"py_modules": [...]}``)
    is passed to Ray for them. A cluster with token authentication needs ``RAY_AUTH_MODE=token``
    and its token in this process's environment, as every Ray client does.
    """
    session = RaySession(address, num_cpus=num_cpus, runtime_env=runtime_env, on_start=on_start)
    try:
        if session.joins or not lazy:
            session.ensure()
        yield session
    finally:
        session.close()


class RaySession:
    """Ray for one command: started (or joined) at most once, in this thread or in the
    background, and stopped on `close` if it was started here."""

    def __init__(
        self,
        address: str | None,
        *,
        num_cpus: int | None = None,
        runtime_env: dict | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        import ray

        self.existing = ray.is_initialized()
        self.address = None if self.existing else (address or os.environ.get("RAY_ADDRESS") or None)
        self.num_cpus = num_cpus
        self.runtime_env = runtime_env
        self.on_start = on_start
        self.started = self.existing
        self._owned = False
        self._thread: threading.Thread | None = None
        self._up = threading.Event()  # the background start finished (or failed)
        self._closed = threading.Event()
        self._error: BaseException | None = None

    @property
    def joins(self) -> bool:
        """Whether every stage runs on Ray's workers: a Ray this session did not start (a
        cluster, or one already up), or ``address="local"``, a local Ray used as a cluster is.
        Otherwise the coordinator does the work a local Ray would only slow down (see
        `_CapturesHere`, `checks`)."""
        return self.existing or self.address is not None

    def start_soon(self, nice: int = 0) -> None:
        """Start Ray in a background thread (Ray's start is mostly waiting on its daemons), so
        the coordinator can plan meanwhile; `ensure` waits for it. The thread lives until
        `close`: Ray's daemons are started with a parent-death signal, which Linux sends when
        the *thread* that started them ends. A local Ray started with `nice` runs its daemons
        and workers that much lower in priority than this process (they inherit the thread's):
        on a few cores, the coordinator's own work then keeps its CPU while Ray starts."""
        if self.started or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._start_and_hold,
            args=(nice if self.address is None else 0,),
            name="shardex-ray",
            daemon=True,
        )
        self._thread.start()

    def ensure(self) -> None:
        """Ray is up when this returns (started here if nothing started it yet)."""
        if self._thread is not None:
            self._up.wait()
            if self._error is not None:
                raise self._error
        if not self.started:
            self._start()

    def wait_up(self, timeout: float) -> bool:
        """Whether Ray is up (or its background start failed: `ensure` raises that), waiting at
        most `timeout` seconds for a start in progress."""
        if self._thread is not None:
            return self._up.wait(timeout)
        return self.started

    @contextlib.contextmanager
    def checks(self) -> Iterator[None]:
        """Where verification's tasks run: a joined cluster's workers (one block group's members
        spread over its nodes); on this machine alone, this process's threads, the same tasks
        in the same order. Locally a worker would only add Ray's start and its own imports (~6 s
        and ~0.4 GB on 2 cores) to checks this process runs as well; see DESIGN.md, Verify."""
        if self.joins:
            self.ensure()
            yield
            return
        token = _RUN_HERE.set(True)
        try:
            yield
        finally:
            _RUN_HERE.reset(token)

    def spans_other_machines(self) -> bool:
        """Whether work placed on Ray may run on another machine than this one: a Ray that is
        up and has a node with CPUs other than this process's node."""
        if not self.started:
            return False
        import ray

        here = ray.get_runtime_context().get_node_id()
        return any(n.node_id != here for n in _nodes() if n.cpus > 0)

    def close(self) -> None:
        if self._thread is not None:
            self._up.wait()
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False
        if self._thread is not None:
            self._closed.set()
            self._thread.join()
            self._thread = None

    def _start_and_hold(self, nice: int) -> None:
        lower_thread_priority(nice)
        try:
            self._start()
        except BaseException as e:  # re-raised by ensure() in the coordinator's thread
            self._error = e
        finally:
            self._up.set()
        self._closed.wait()

    def _start(self) -> None:
        import ray

        start = time.perf_counter()
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.ERROR,  # Ray's own start-up warnings are not the user's business
            "log_to_driver": False,
        }
        if self.address in (None, LOCAL):
            kwargs["num_cpus"] = self.num_cpus or os.cpu_count()
            kwargs["runtime_env"] = _local_runtime_env(self.runtime_env)
        elif self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        with _quiet_ray_logger():
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as e:
                raise ShardexError(_auth_error(self.address, e) or _start_error(self.address, e)) from e
        self.started = self._owned = True
        resources = ray.cluster_resources()
        logger.info(
            "Ray %s in %.1fs: %d node(s), %g CPUs, %g GPUs",
            f"joined at {self.address}" if self.address not in (None, LOCAL) else "started locally",
            time.perf_counter() - start,
            len(_nodes()),
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
        if self.on_start is not None:
            self.on_start()


def lower_thread_priority(nice: int) -> None:
    """Lower this thread's CPU priority by `nice` (Linux keeps a nice value per thread, and a
    process it starts inherits it)."""
    if nice:
        try:
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice
            )
        except OSError:  # not allowed here: the thread keeps the coordinator's priority
            pass


@contextlib.contextmanager
def _quiet_ray_logger() -> Iterator[None]:
    """Ray warns that it sets no SIGTERM handler when started off the main thread: that is
    the point (the CLI's own handler stays)."""
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray_logger.setLevel(level)


def _local_runtime_env(runtime_env: dict | None) -> dict:
    """The caller's runtime environment for a local Ray, with the driver's import path added."""
    local = worker_runtime_env()
    if not runtime_env:
        return local
    return runtime_env | {"env_vars": local["env_vars"] | runtime_env.get("env_vars", {})}


def _auth_error(address: str | None, error: BaseException) -> str | None:
    """The one-line fix when joining failed on token authentication (Ray reports it only deep in
    the exception chain, after retrying for 20 s), else None."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    if not any("InvalidAuthToken" in t or "AuthenticationError" in t for t in texts):
        return None
    where = f"cannot join Ray at {address}" if address else "cannot start a local Ray"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return f"{where}: it requires token authentication; set RAY_AUTH_MODE=token and {TOKEN_PLACES}."
    source = _token_source()
    if source is None:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        missing = f" (RAY_AUTH_TOKEN_PATH={path} is missing or empty)" if path else ""
        return f"{where}: RAY_AUTH_MODE=token but no token was found{missing}; set {TOKEN_PLACES}."
    return (
        f"{where}: it rejected the token from {source}; use the cluster's token "
        "(`ray get-auth-token` on its head node prints it)."
    )


def _token_source() -> str | None:
    """Where Ray takes the token from (Ray's order of precedence), or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if _has_token(path) else None
    return DEFAULT_TOKEN_PATH if _has_token(os.path.expanduser(DEFAULT_TOKEN_PATH)) else None


def _has_token(path: str) -> bool:
    try:
        with open(path) as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _start_error(address: str | None, error: BaseException) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"cannot start or join Ray at {address or 'a local Ray'}: {type(error).__name__}: {first_line}"


@dataclasses.dataclass
class Task:
    label: str
    fn: Callable
    args: tuple
    # Kernel copies and fsync barely use a CPU: such tasks take no CPU slot, so weight streaming
    # overlaps capture instead of queueing behind it. They are bounded separately.
    io_bound: bool = False
    # Ask for a share of a GPU when the task lands on a node that has one (none elsewhere).
    gpu: bool = False


def active_recordings() -> tuple[list[TaskRecord], ...]:
    """The lists of the enclosing `recording()` blocks, for work that runs outside Ray (threads
    of the coordinator, which do not inherit this context) to append its records to."""
    return _RECORDINGS.get()


@contextlib.contextmanager
def recording() -> Iterator[list[TaskRecord]]:
    """Collect a `TaskRecord` for every task that `run_tasks` completes inside the block, in
    order of completion: the data of the timeline and of the per-node summary."""
    records: list[TaskRecord] = []
    token = _RECORDINGS.set((*_RECORDINGS.get(), records))
    try:
        yield records
    finally:
        _RECORDINGS.reset(token)


def run_tasks(
    tasks: list[Task],
    *,
    max_in_flight: int | None,
    on_done: Callable[[Task, Any], None] | None = None,
    cpus_per_task: float = 1,
    claim: Callable[[int], bool] | None = None,
) -> list:
    """Run `tasks` as Ray tasks spread over the nodes (see `_cluster.Placer`): at most
    `max_in_flight` CPU tasks, each holding `cpus_per_task` CPUs, and as many I/O tasks at once
    (default: every slot of the cluster, ``CPUs // cpus_per_task`` per node). Results in task
    order; each task's `TaskRecord` goes to the enclosing `recording()` blocks. A stage error
    raised on a worker is re-raised here as itself; a task whose worker dies is retried by Ray,
    on another node if its node is gone. With `claim`, a task is sent only once a slot is free
    for it and `claim(index)` agrees (someone else may have taken it meanwhile: its result
    stays None). Inside `RaySession.checks()` on a local machine, the tasks run one after
    another in the calling thread instead, recorded on the coordinator's row."""
    if _RUN_HERE.get():
        return _run_here(tasks, on_done)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    placer = Placer(_nodes(), cpus_per_task=cpus_per_task, max_in_flight=max_in_flight)
    traced = ray.remote(max_retries=TASK_RETRIES)(_traced)
    pending: dict[Any, tuple[int, NodeInfo]] = {}
    results: list = [None] * len(tasks)
    queue = list(enumerate(tasks))
    try:
        while queue or pending:
            for index, task in list(queue):
                node = placer.take(task.io_bound)
                if node is None:
                    continue
                if claim is not None and not claim(index):
                    placer.release(node, task.io_bound)
                    queue.remove((index, task))
                    continue
                cpus = 0 if task.io_bound else cpus_per_task
                gpus = placer.gpus_for(node) if task.gpu else 0
                ref = traced.options(
                    name=task.label,
                    num_cpus=cpus,
                    num_gpus=gpus,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=True),
                ).remote(task.label, cpus, gpus, task.fn, *task.args)
                pending[ref] = (index, node)
                queue.remove((index, task))
            if not pending:
                continue
            done, _ = ray.wait(list(pending), num_returns=1)
            index, node = pending.pop(done[0])
            placer.release(node, tasks[index].io_bound)
            results[index], record = _get(done[0], tasks[index])
            for records in _RECORDINGS.get():
                records.append(record)
            if on_done:
                on_done(tasks[index], results[index])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return results


def _run_here(tasks: list[Task], on_done: Callable[[Task, Any], None] | None) -> list:
    results = []
    for task in tasks:
        results.append(run_recorded(task, _RECORDINGS.get()))
        if on_done:
            on_done(task, results[-1])
    return results


def run_recorded(task: Task, sinks: Sequence[list[TaskRecord]]) -> Any:
    """Run `task` in this thread; its record (on the coordinator's row) goes to `sinks` (the
    `recording()` lists of the thread that handed the work out)."""
    start = time.time()
    result = task.fn(*task.args)
    record = coordinator_record(task.label, start, time.time())
    for records in sinks:
        records.append(record)
    return result


def _traced(label: str, cpus: float, gpus: float, fn: Callable, *args) -> tuple[Any, TaskRecord]:
    """A task's body on its worker: run `fn`, and note where and when it ran."""
    import ray

    start = time.time()
    result = fn(*args)
    node_id = ray.get_runtime_context().get_node_id()
    where = (node_id, socket.gethostname(), ray.util.get_node_ip_address(), os.getpid())
    return result, TaskRecord(label, *where, start, time.time(), cpus, gpus)


def _get(ref, task: Task):
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, ShardexError):
            raise cause from None
        missing = _missing_module(e)
        if missing:
            raise ShardexError(f"{task.label} failed: {missing}; {INSTALL_FIX}.") from e
        raise ShardexError(
            f"{task.label} failed on a Ray worker: {type(cause).__name__}: {_first_line(cause)}"
        ) from e
    except ray.exceptions.RayError as e:
        raise ShardexError(
            f"{task.label} failed after {TASK_RETRIES} retries: {type(e).__name__}: {_first_line(e)}"
        ) from e


def probe_failure(node: NodeInfo, error: BaseException) -> str:
    """The one line for a storage probe that raised instead of reporting: a worker that cannot
    import shardex is told to install it; a worker that died (already retried) is not."""
    missing = _missing_module(error)
    if missing:
        return f"the storage probe failed on Ray node {node}: {missing}; {INSTALL_FIX}."
    return (
        f"the storage probe failed on Ray node {node} after {TASK_RETRIES} retries: "
        f"{type(error).__name__}: {_first_line(error).rstrip('.')}; check the node's health (`ray status`, its logs)."
    )


def _missing_module(error: BaseException) -> str | None:
    """'No module named X' when a task failed because its worker cannot import a module."""
    match = re.search(r"No module named '([\w.]+)'", str(error))
    return f"its worker cannot import {match[1]!r} (No module named {match[1]!r})" if match else None


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (Ray prefixes it with a task header line)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.lstrip().startswith(("\x1b", "ray::"))]
    return (meaningful or lines or [""])[0].strip()


def node_count() -> int:
    """How many alive nodes offer CPUs (this machine alone inside a local `RaySession.checks()`)."""
    if _RUN_HERE.get():
        return 1
    return sum(1 for n in _nodes() if n.cpus > 0)


def _nodes() -> list[NodeInfo]:
    import ray

    return [
        NodeInfo(
            n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)
        )
        for n in ray.nodes()
        if n["Alive"]
    ]


def warm_up(fn: Callable, *args) -> None:
    """Run `fn(*args)` once per CPU slot of the cluster, without waiting: the worker processes
    that take the first tasks do their slow imports while the coordinator is still planning."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=1, max_retries=0)(fn)
    for node in _nodes():
        strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=True)
        for _ in range(int(node.cpus)):
            remote.options(name="warm up", scheduling_strategy=strategy).remote(*args)


def check_output_visible(output_dir: str, *, readable: Sequence[str] = ()) -> None:
    """Before any work: on every node that takes work, check that `output_dir` is the
    coordinator's directory (a marker file written here is visible there) and writable there,
    that the `readable` files (the source) can be read there, and that the node runs this
    machine's shardex, torch, onnxscript and onnx-ir. Raises `OptionsError`, one line naming the
    node, the path and the fix. Nothing to check when this machine is the only node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in _nodes() if n.cpus > 0]
    if {n.node_id for n in nodes} <= {ray.get_runtime_context().get_node_id()}:
        return
    probe = ray.remote(num_cpus=0, max_retries=TASK_RETRIES)(probe_node)
    expected = package_versions()
    with marker_file(output_dir) as marker:
        refs = [
            probe.options(
                name=f"probe {node}",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            ).remote(output_dir, marker, list(readable))
            for node in nodes
        ]
        for node, ref in zip(nodes, refs):
            try:
                found = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise OptionsError(probe_failure(node, e)) from e
            message = probe_error(node, found, expected)
            if message:
                raise OptionsError(message)
    logger.info("storage: %s is shared by all %d nodes", output_dir, len(nodes))
