"""The Ray layer, the only module that imports ray.

Stage functions stay plain Python (each runs in-process in unit tests); this module ships them
to Ray workers as tasks, bounds how many run at once, and turns a worker's failure back into
the stage's own one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from shardex._errors import ShardexError

logger = logging.getLogger("shardex")

TASK_RETRIES = 2  # a task whose worker process dies is rerun this many times


def worker_runtime_env() -> dict:
    """Environment for workers of a Ray started here: the driver's import path, so the package
    (even from a source checkout) and factory modules import the same way on workers."""
    paths = [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))}}


@contextlib.contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None) -> Iterator[str]:
    """Use the Ray already initialized in this process, join `address` / ``RAY_ADDRESS``, or
    start a local Ray for the duration of the block (and stop it after)."""
    import ray

    if ray.is_initialized():
        yield "existing"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    start = time.perf_counter()
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if address is None:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        kwargs["runtime_env"] = worker_runtime_env()
    try:
        context = ray.init(address=address, **kwargs)
    except Exception as e:
        where = address or "a local Ray"
        raise ShardexError(f"cannot start or join Ray at {where}: {type(e).__name__}: {e}") from e
    logger.info(
        "Ray %s in %.1fs",
        f"joined at {address}" if address else "started locally",
        time.perf_counter() - start,
    )
    try:
        yield context.address_info.get("address", "local")
    finally:
        ray.shutdown()


@dataclasses.dataclass
class Task:
    label: str
    fn: Callable
    args: tuple
    # Kernel copies and fsync barely use a CPU: such tasks take no CPU slot, so weight streaming
    # overlaps capture instead of queueing behind it. They are bounded separately.
    io_bound: bool = False


def run_tasks(
    tasks: list[Task], *, max_in_flight: int | None, on_done: Callable[[Task, Any], None] | None = None
) -> list:
    """Run `tasks` as Ray tasks, at most `max_in_flight` CPU tasks and as many I/O tasks at once
    (default: the cluster's CPU count); results in task order. A stage error raised on a worker
    is re-raised here as itself; a task whose worker dies is retried by Ray."""
    import ray

    remote = {}
    pending: dict[Any, int] = {}
    results: list = [None] * len(tasks)
    queue = list(enumerate(tasks))
    limit = max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
    running = {False: 0, True: 0}
    try:
        while queue or pending:
            for index, task in list(queue):
                if running[task.io_bound] >= limit:
                    continue
                key = (task.fn, task.io_bound)
                if key not in remote:
                    remote[key] = ray.remote(num_cpus=0 if task.io_bound else 1, max_retries=TASK_RETRIES)(
                        task.fn
                    )
                pending[remote[key].options(name=task.label).remote(*task.args)] = index
                running[task.io_bound] += 1
                queue.remove((index, task))
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            running[tasks[index].io_bound] -= 1
            results[index] = _get(done[0], tasks[index])
            if on_done:
                on_done(tasks[index], results[index])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return results


def _get(ref, task: Task):
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, ShardexError):
            raise cause from None
        raise ShardexError(f"{task.label} failed on a Ray worker: {type(cause).__name__}: {cause}") from e
    except ray.exceptions.RayError as e:
        raise ShardexError(
            f"{task.label} failed after {TASK_RETRIES} retries: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
