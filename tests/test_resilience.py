"""Faults and resume: killed workers and a killed coordinator still give byte-identical output.

On one machine the shards are written by the coordinator's threads (no Ray worker to kill): a
killed coordinator, resumed, is their fault case."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import shardex
from tests import models


def output_digests(out) -> dict[str, str]:
    """sha256 of model.onnx and every shard: what must be identical between runs."""
    names = sorted(n for n in os.listdir(out) if n == "model.onnx" or n.endswith(".data"))
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory):
    """~150 MB of weights in many shards, so weight streaming lasts long enough to interrupt."""
    path = tmp_path_factory.mktemp("medium") / "ckpt"
    subprocess.run(
        [
            sys.executable,
            "scripts/make_checkpoint.py",
            str(path),
            "--hidden",
            "512",
            "--layers",
            "6",
            "--vocab",
            "32000",
            "--shard-gb",
            "0.05",
        ],
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def clean_export(medium_checkpoint, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("clean") / "out"
    shardex.export(medium_checkpoint, out, max_shard_size="16MB", verify=False)
    return out


@pytest.mark.usefixtures("ray_local")
def test_output_is_identical_whatever_the_worker_count(medium_checkpoint, clean_export, tmp_path):
    shardex.export(medium_checkpoint, tmp_path / "one", max_shard_size="16MB", verify=False, workers=1)
    assert output_digests(tmp_path / "one") == output_digests(clean_export)


class _Killer(threading.Thread):
    """Kills (by PID) the first Ray worker of this process tree whose title starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__(daemon=True)
        self.prefix = prefix
        self.killed: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set() and self.killed is None:
            for process in me.children(recursive=True):
                try:
                    title = " ".join(process.cmdline())
                except psutil.Error:
                    continue
                if title.startswith(self.prefix):
                    os.kill(process.pid, signal.SIGKILL)
                    self.killed = title
                    return
            time.sleep(0.005)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("prefix", ["ray::capture trunk", "ray::verify global"])
def test_worker_killed_mid_task_is_retried(medium_checkpoint, clean_export, tmp_path, prefix):
    killer = _Killer(prefix)
    killer.start()
    try:
        verify = prefix.startswith("ray::verify")
        shardex.export(medium_checkpoint, tmp_path / "out", max_shard_size="16MB", verify=verify)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, f"no {prefix} worker was seen to kill"
    assert output_digests(tmp_path / "out") == output_digests(clean_export)
    if verify:
        assert shardex.load_manifest(tmp_path / "out")["verification"]["passed"]
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".partial") or n.startswith(".journal")]


EXPORT = "import sys, shardex; shardex.export(sys.argv[1], sys.argv[2], max_shard_size='16MB', verify=False)"


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the coordinator and every process it started (its local Ray), by PID."""
    try:
        tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    psutil.wait_procs(tree, timeout=10)


@pytest.mark.usefixtures("ray_local")
def test_killed_coordinator_resumes_byte_identical(medium_checkpoint, clean_export, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", EXPORT, str(medium_checkpoint), str(out)])
    journal = out / ".journal.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists():
                try:
                    if json.loads(journal.read_text())["shards"]:
                        break
                except (ValueError, KeyError):
                    pass  # caught between write and rename
            assert process.poll() is None, "the export finished before it could be interrupted"
            time.sleep(0.01)
    finally:
        kill_tree(process)
    assert not (out / "manifest.json").exists() and not (out / "model.onnx").exists()

    shardex.export(medium_checkpoint, out, max_shard_size="16MB", verify=False, resume=True)

    assert output_digests(out) == output_digests(clean_export)
    manifest = shardex.load_manifest(out)
    total = sum(s["nbytes"] for s in manifest["shards"])
    assert manifest["reused_shards"] and manifest["bytes_written"] < total
    assert not [n for n in os.listdir(out) if n.endswith(".partial") or n.startswith(".journal")]


def test_resume_refuses_another_models_export(tmp_path, ray_local):
    first = models.make_llama(tmp_path / "a", layers=2)
    second = models.make_llama(tmp_path / "b", layers=3)
    shardex.export(first, tmp_path / "out", verify=False)
    with pytest.raises(shardex.OptionsError) as caught:
        shardex.export(second, tmp_path / "out", verify=False, resume=True)
    assert "another model" in str(caught.value)
    assert shardex.load_manifest(tmp_path / "out")["source"]["location"] == os.fspath(tmp_path / "a")
