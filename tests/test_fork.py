"""The coordinator's capture fork (`_fork.CaptureFork`): tasks run in the fork and come back;
whatever the fork cannot take runs in the coordinator; its errors arrive as raised; it exits
when closed."""

from __future__ import annotations

import os
import signal
import time

import pytest

from shardex import _ray
from shardex._errors import CaptureError
from shardex._export import _CapturesHere
from shardex._fork import FORK_LOST, CaptureFork, spare_fork
from tests import models
from tests.cli_support import coordinator_capture_hands, export_without_ray

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the capture fork is Linux-only")


def where(label: str, pause: float = 0.0) -> tuple[str, int]:
    time.sleep(pause)
    return label, os.getpid()


def fails(label: str) -> None:
    raise CaptureError(f"capturing {label} failed: NotImplementedError: no translation", piece=label)


def test_a_task_runs_in_the_fork_and_is_recorded_with_its_pid():
    records: list = []
    with spare_fork(True, "module", None) as fork:
        assert fork.run(_ray.Task("capture trunk", where, ("trunk",)), [records]) == (
            "trunk",
            fork.process.pid,
        )
        assert fork.process.pid != os.getpid()
        assert [(r.label, r.pid) for r in records] == [("capture trunk", fork.process.pid)]
    assert fork.process.exitcode == 0  # closed: told to exit, and waited for


def test_an_error_in_the_fork_is_raised_as_it_was():
    with spare_fork(True, "module", None) as fork:
        with pytest.raises(CaptureError, match="capturing block failed: NotImplementedError") as raised:
            fork.run(_ray.Task("capture block", fails, ("block",)), [])
        assert raised.value.piece == "block"
        assert fork.run(_ray.Task("capture trunk", where, ("trunk",)), []) == ("trunk", fork.process.pid)


def test_a_task_that_does_not_pickle_is_left_to_the_coordinator():
    with spare_fork(True, "module", None) as fork:
        assert fork.run(_ray.Task("capture trunk", lambda: None, ()), []) is FORK_LOST
        assert fork.process.exitcode == 0  # a fork that cannot take a task takes no more
        assert fork.run(_ray.Task("capture trunk", where, ("trunk",)), []) is FORK_LOST


def test_a_lost_fork_leaves_its_captures_to_the_coordinator():
    fork = CaptureFork.start("module", None)
    os.kill(fork.process.pid, signal.SIGKILL)
    fork.process.join()
    done = []
    tasks = [_ray.Task(f"capture {n}", where, (n,)) for n in ("trunk", "a", "b")]
    with _CapturesHere(tasks, done.append, run=True, fork=fork) as here:
        results = here.merged([])
    assert results == [(n, os.getpid()) for n in ("trunk", "a", "b")]
    assert sorted(done) == sorted(results)


def test_the_coordinator_and_its_fork_share_the_captures():
    tasks = [_ray.Task(f"capture {n}", where, (n, 0.5)) for n in ("trunk", "a", "b", "c")]
    with (
        spare_fork(True, "module", None) as fork,
        _CapturesHere(tasks, lambda r: None, run=True, fork=fork) as here,
    ):
        results = here.merged([])
    assert [label for label, _ in results] == ["trunk", "a", "b", "c"]
    assert results[0][1] == fork.process.pid  # the fork takes from the front, the trunk first
    assert results[-1][1] == os.getpid()  # this process from the back


def test_no_fork_where_none_is_wanted():
    with spare_fork(False, "module", None) as fork:
        assert fork is None


def test_an_unused_fork_is_stopped_without_finishing_its_warm_up():
    fork = CaptureFork.start("hf", None)
    fork.close()
    assert fork.process.exitcode == -signal.SIGKILL


def test_one_worker_asked_for_means_no_fork(tmp_path):
    """`--workers 1` is one task at a time: the coordinator captures the trunk and the block
    itself, one after the other, and starts no fork beside it."""
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2)
    done = export_without_ray(ckpt, tmp_path / "out", "--workers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(coordinator_capture_hands(tmp_path / "out")) == 1
