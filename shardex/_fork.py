"""A warm spare process for the coordinator's captures.

On one machine the coordinator captures pieces itself (see `_export._CapturesHere`): it has
torch, the model's code and torch.onnx warm, where a fresh Ray worker spends seconds starting
and importing. Captures are Python-bound and serialized within a process, so a second core
needs a second process. A fork of the coordinator, taken when the export starts, has every
import the coordinator made so far; it imports and builds the rest of what a capture needs
(torch.onnx, transformers' exporter, the op registry) while the coordinator plans, and then
captures the pieces it is sent beside the coordinator's own thread.

Linux only: fork is unsafe on macOS and absent on Windows. The fork is taken before any
capture or writer thread exists, so no lock a capture needs is held in it; the sampler thread
it does not inherit only reads /proc. Whatever the fork cannot do (a task that does not
pickle, a fork that died) is done by the coordinator instead: the fork is an accelerator,
never a requirement.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from shardex._capture import warm_up
from shardex._cluster import coordinator_record
from shardex._errors import CaptureError

logger = logging.getLogger("shardex")

FORK_LOST = object()  # `CaptureFork.run`'s answer when the task must be run by the coordinator


class CaptureFork:
    """The spare process and the coordinator's end of its pipe."""

    def __init__(self, process, connection) -> None:
        self.process = process
        self.connection = connection
        self.usable = True
        self.sent = False

    @classmethod
    def start(cls, source_kind: str, opset: int | None) -> CaptureFork | None:
        """Fork now and warm up for captures of a `source_kind` source at `opset`; None where
        this platform has no safe fork."""
        if not sys.platform.startswith("linux"):
            return None
        context = multiprocessing.get_context("fork")
        mine, theirs = context.Pipe()
        process = context.Process(
            target=_serve, args=(theirs, source_kind, opset), name="shardex-capture", daemon=True
        )
        with warnings.catch_warnings():  # Python 3.12+ warns of any fork of a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            process.start()
        theirs.close()
        return cls(process, mine)

    def run(self, task, sinks) -> Any:
        """Run `task` (a `_ray.Task`) in the fork; its record goes to `sinks`, with the fork's
        PID as its worker. `FORK_LOST` when the fork cannot take it (the task or its
        arguments do not pickle, or the fork died): the caller runs it, and the fork is done."""
        if not self.usable:
            return FORK_LOST
        start = time.time()
        self.sent = True
        try:
            self.connection.send(task)
            ok, result = self.connection.recv()
        except Exception as e:  # pickling (e.g. a factory source's closure), or a lost fork
            ok, result = None, e
        if ok is None:  # not sent, not received, or not unpickled in the fork
            logger.debug(
                "capture fork %d cannot run %s (%s); running it here", self.process.pid, task.label, result
            )
            self.close()
            return FORK_LOST
        if not ok:
            raise result
        record = coordinator_record(task.label, start, time.time(), pid=self.process.pid)
        for records in sinks:
            records.append(record)
        return result

    def close(self) -> None:
        """End the fork and wait for it (idempotent): told to exit once it has captured, stopped
        at once if it never was sent a capture (every piece cached, or one only), so that its
        warm-up does not take a core from the weights."""
        if not self.usable:
            return
        self.usable = False
        if self.sent:
            with contextlib.suppress(OSError):
                self.connection.send(None)
        else:  # SIGKILL: the fork inherited this process's signal handlers, SIGTERM's included
            self.process.kill()
        self.process.join()
        self.connection.close()


@contextlib.contextmanager
def spare_fork(wanted: bool, source_kind: str, opset: int | None) -> Iterator[CaptureFork | None]:
    """A `CaptureFork` for this export's captures (when `wanted`: captures may run here), closed
    after the block."""
    fork = CaptureFork.start(source_kind, opset) if wanted else None
    try:
        yield fork
    finally:
        if fork is not None:
            fork.close()


def _serve(connection, source_kind: str, opset: int | None) -> None:
    """The fork's loop: warm up, then run each task received and send back ``(True, result)``
    or ``(False, error)``; ``(None, reason)`` for a task it could not receive. Ends on None or
    when the coordinator's end closes (the coordinator exited). Ctrl-C is the coordinator's to
    handle: it lets the capture in flight finish, as its own capture thread does, then ends
    this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the coordinator's handler (Ray's driver has one)
    torch.set_num_threads(1)  # the coordinator's OpenMP threads are not in this process
    with contextlib.suppress(Exception):  # only a head start: a capture reports its own errors
        warm_up(source_kind, opset)
    with contextlib.suppress(EOFError, OSError):  # the coordinator is gone: nobody to answer
        while True:
            data = connection.recv_bytes()
            try:
                with warnings.catch_warnings():  # torch's pytree deprecations, unpickling a plan's specs
                    warnings.simplefilter("ignore")
                    task = ForkingPickler.loads(data)
            except Exception as e:  # e.g. a module the task names is not importable here
                connection.send((None, f"{type(e).__name__}: {e}"))
                return
            if task is None:
                return
            try:
                reply = ForkingPickler.dumps((True, task.fn(*task.args)))
            except Exception as e:
                try:
                    reply = ForkingPickler.dumps((False, e))
                except Exception:  # an error that does not pickle (shardex's own do): its one line
                    error = CaptureError(f"{task.label}: {type(e).__name__}: {e}", piece=task.label)
                    reply = ForkingPickler.dumps((False, error))
            connection.send_bytes(reply)
