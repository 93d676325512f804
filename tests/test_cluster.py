"""shardex on a real Ray cluster of two nodes on this machine (cluster/local_cluster.py): joining
with token authentication, tasks placed on both nodes, the storage probe, the timeline; and the
Ray-free placement, probe and trace code in-process.

The worker node declares one GPU (a Ray resource: this machine has no GPU, so CUDA stays
unavailable there) and runs in a mount namespace of its own, where one directory is a private
tmpfs (a disk only that node has) and another is mounted read-only: what a second machine
without the shared filesystem would see. Drivers run in subprocesses, apart from the
session-wide local Ray of conftest. The fixture stops every node process, and checks them gone,
even when a test fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import shardex
from shardex import _cluster, _ray
from shardex._cluster import NodeInfo, Placer, TaskRecord
from tests import models

REPO = Path(__file__).resolve().parent.parent


def load_local_cluster():
    """cluster/local_cluster.py as a module (cluster/ is a folder of recipes, not a package)."""
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "cluster" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def private_mounts(node_local: Path, read_only: Path) -> list[str]:
    """A command prefix: run in a new mount namespace with `node_local` hidden under a private
    tmpfs and `read_only` remounted read-only (even root cannot write there)."""
    script = 'mount -t tmpfs tmpfs "$1" && mount --bind "$2" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        str(node_local),
        str(read_only),
    ]


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclasses.dataclass
class TwoNodes:
    env: dict[str, str]
    address: str
    node_local: Path  # a directory the worker node sees as an empty tmpfs
    read_only: Path  # a directory the worker node sees read-only
    isolated: bool  # False where mount namespaces are not allowed: the two directories are plain


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("storage")
    node_local, read_only = base / "node_local", base / "read_only"
    node_local.mkdir()
    read_only.mkdir()
    isolated = can_unshare()
    cluster = load_local_cluster().LocalCluster(workers=0)
    try:
        cluster.start()
        cluster.add_node(num_gpus=1, prefix=private_mounts(node_local, read_only) if isolated else ())
        yield TwoNodes(cluster.driver_env, cluster.address, node_local, read_only, isolated)
    finally:
        groups = [p.pid for p in cluster.processes]  # each node's process group
        cluster.stop()
        left = [p.pid for p in psutil.process_iter() if _pgid(p.pid) in groups]
        assert not left, f"processes of the cluster still running: {left}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def run_driver(cluster: TwoNodes, script: str, *args, timeout: float = 600):
    """Run `script` in a fresh Python joined to the cluster; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(os.fspath, args)],
        env=cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


NODE_NAMES = """
    def node_names(address):
        import ray
        from shardex import _ray
        with _ray.ray_session(address):
            return {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes()}
"""


EXPORT = (
    NODE_NAMES
    + """
    import json, sys
    import shardex
    ckpt, out, address = sys.argv[1:]
    try:
        shardex.export(ckpt, out, address=address, max_shard_size="100KB")
        error = None
    except shardex.OptionsError as e:
        error = str(e)
    print(json.dumps({"error": error, "names": node_names(address)}))
    """
)


def test_export_runs_on_both_nodes(two_nodes, tmp_path):
    """The manifest's placement and the timeline show capture, weights and verification on both
    nodes; verification took the worker node's GPU, nothing else asked for one."""
    ckpt = models.make_llama(tmp_path / "ckpt", layers=4)
    out = tmp_path / "out"
    found = run_driver(two_nodes, EXPORT, ckpt, out, two_nodes.address)

    assert found["error"] is None
    names = found["names"]
    manifest = shardex.load_manifest(out)
    assert manifest["status"] == "complete"
    # The coordinator's own threads wrote the shard of the buffers it holds (rotary inv_freq).
    local = [node for node in manifest["placement"] if node["node_id"] == _cluster.COORDINATOR]
    assert [node["stages"] for node in local] == [{"write": 1}]
    stages = {names[node["node_id"]]: node["stages"] for node in manifest["placement"] if node not in local}
    assert set(stages) == {"node_0", "node_1"}, stages
    assert set().union(*stages.values()) == {"capture", "write", "verify"}

    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X" and e["args"]["node_id"] != _cluster.COORDINATOR]
    assert len(spans) == sum(node["tasks"] for node in manifest["placement"] if node not in local)
    assert len([e for e in events if e["name"] == "process_name"]) == 3
    for span in spans:
        on_gpu_node = names[span["args"]["node_id"]] == "node_1"
        assert span["args"]["cpus"] == (0 if span["cat"] == "write" else 1), span
        assert span["args"]["gpus"] == (1 if span["cat"] == "verify" and on_gpu_node else 0), span


def test_export_refuses_an_output_dir_a_node_cannot_see(two_nodes, tmp_path):
    """Before any work: one line naming the worker node, the directory and the fix."""
    if not two_nodes.isolated:
        pytest.skip("mount namespaces (unshare --mount) are not allowed here: no node-local directory")
    ckpt = models.make_llama(tmp_path / "ckpt", layers=2)
    out = two_nodes.node_local / "refused"
    found = run_driver(two_nodes, EXPORT, ckpt, out, two_nodes.address)

    worker = next(node_id for node_id, name in found["names"].items() if name == "node_1")
    assert found["error"].startswith(f"on Ray node {socket.gethostname()} ")
    assert (
        f"(node {worker[:8]}): output directory {out} does not exist; put the output directory"
        in found["error"]
    )
    assert "\n" not in found["error"]
    assert set(os.listdir(out)) <= {".journal.json"}, (
        "no shard, no model: only the coordinator's empty journal"
    )


GPU_TASKS = (
    NODE_NAMES
    + """
    import dataclasses, json, os, sys
    from shardex import _ray
    address = sys.argv[1]
    tasks = [_ray.Task(f"verify {i}", os.getenv, ("CUDA_VISIBLE_DEVICES",), gpu=True) for i in range(4)]
    with _ray.ray_session(address), _ray.recording() as records:
        visible = _ray.run_tasks(tasks, max_in_flight=None)
    records = {r.label: dataclasses.asdict(r) for r in records}
    print(json.dumps({"visible": visible, "records": [records[t.label] for t in tasks], "names": node_names(address)}))
    """
)


def test_gpu_tasks_ask_for_a_gpu_only_on_the_gpu_node(two_nodes):
    found = run_driver(two_nodes, GPU_TASKS, two_nodes.address)

    placed = [
        (found["names"][r["node_id"]], r["gpus"], v) for r, v in zip(found["records"], found["visible"])
    ]
    assert {name for name, _, _ in placed} == {"node_0", "node_1"}
    for name, gpus, visible in placed:
        if name == "node_1":
            assert (gpus, visible) == (1, "0"), placed  # Ray hands the task the node's GPU
        else:
            assert gpus == 0, placed


PROBE = (
    NODE_NAMES
    + """
    import json, sys
    from shardex import _ray
    from shardex._errors import OptionsError
    address, cases = sys.argv[1], json.loads(sys.argv[2])
    results = {}
    with _ray.ray_session(address):
        for name, (directory, readable) in cases.items():
            try:
                _ray.check_output_visible(directory, readable=readable)
                results[name] = None
            except OptionsError as e:
                results[name] = str(e)
    print(json.dumps({"results": results, "names": node_names(address)}))
    """
)


def test_storage_probe_names_the_node_that_cannot_see_the_output(two_nodes, tmp_path):
    if not two_nodes.isolated:
        pytest.skip(
            "mount namespaces (unshare --mount) are not allowed here: no node-local directory to probe"
        )
    shared = tmp_path / "shared_out"
    for directory in (shared, two_nodes.node_local / "out", two_nodes.read_only / "out"):
        directory.mkdir()
    source = two_nodes.node_local / "model.safetensors"
    source.write_bytes(b"weights")
    cases = {
        "shared": (str(shared), []),
        "node_local": (str(two_nodes.node_local / "out"), []),
        "read_only": (str(two_nodes.read_only / "out"), []),
        "source": (str(shared), [str(source)]),
    }
    found = run_driver(two_nodes, PROBE, two_nodes.address, json.dumps(cases))

    results = found["results"]
    worker = next(node_id for node_id, name in found["names"].items() if name == "node_1")
    assert results["shared"] is None
    assert f"output directory {two_nodes.node_local / 'out'} does not exist" in results["node_local"]
    assert (
        f"output directory {two_nodes.read_only / 'out'} is not writable (Read-only file system)"
        in results["read_only"]
    )
    assert f"source file {source} is not readable" in results["source"]
    for message in (results["node_local"], results["read_only"], results["source"]):
        assert "\n" not in message and worker[:8] in message and "same path" in message, message
    assert os.listdir(shared) == [], "the probe left files behind"


def kill_first_probe(timeout: float = 120) -> str | None:
    """SIGKILL (by PID) the first Ray worker of this process tree running a storage probe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.Process().children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::probe"):
                os.kill(process.pid, signal.SIGKILL)
                return title
        time.sleep(0.01)
    return None


def test_storage_probe_worker_killed_is_retried(two_nodes, tmp_path):
    """A probe whose worker dies is rerun, and the check passes: no "install shardex" verdict
    for a worker that merely died. The source is a FIFO: a probe opening it waits for a writer,
    which gives the test all the time it needs to kill one."""
    shared = tmp_path / "shared_out"
    shared.mkdir()
    source = tmp_path / "model.safetensors"
    os.mkfifo(source)
    cases = {"shared": (str(shared), [str(source)])}
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PROBE), two_nodes.address, json.dumps(cases)],
        env=two_nodes.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        killed = kill_first_probe()
        writer = os.open(source, os.O_RDWR)  # a reader and a writer: every probe's open returns
        try:
            stdout, stderr = driver.communicate(timeout=300)
        finally:
            os.close(writer)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert killed, "no probe was seen to kill"
    assert driver.returncode == 0, stderr[-4000:]
    assert json.loads(stdout.strip().splitlines()[-1])["results"] == {"shared": None}


def test_probe_failure_blames_a_missing_module_only_when_one_is_missing(ray_local, tmp_path, monkeypatch):
    """A real task whose module the workers cannot import, next to a worker that died."""
    import ray

    (tmp_path / "only_on_the_driver.py").write_text("def probe():\n    return None\n")
    monkeypatch.syspath_prepend(tmp_path)  # the workers' import path was fixed when Ray started
    only_on_the_driver = importlib.import_module("only_on_the_driver")
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(ray.remote(num_cpus=0, max_retries=0)(only_on_the_driver.probe).remote())
    at = node("n")
    missing = _ray.probe_failure(at, caught.value)
    assert "cannot import 'only_on_the_driver'" in missing and _cluster.INSTALL_FIX in missing
    died = _ray.probe_failure(at, ray.exceptions.WorkerCrashedError())
    assert "install" not in died and "after 2 retries: WorkerCrashedError: The worker died" in died
    assert "\n" not in missing and "\n" not in died


JOIN = """
    import json, sys
    from shardex import _ray
    from shardex._errors import ShardexError
    try:
        with _ray.ray_session(sys.argv[1]):
            print(json.dumps(None))
    except ShardexError as e:
        print(json.dumps(str(e)))
"""


def test_joining_without_the_token_fails_with_the_fix(two_nodes, tmp_path):
    """Ray retries a rejected connection 20 times, a second apart; the test lets it try twice
    (what is tested is the diagnosis of the failure, not Ray's patience)."""
    base = {k: v for k, v in two_nodes.env.items() if not k.startswith("RAY_AUTH")}
    base["RAY_NUM_REDIS_GET_RETRIES"] = "2"
    envs = {
        "no_mode": base,
        "wrong_token": base | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
        "no_token": base | {"RAY_AUTH_MODE": "token", "HOME": str(tmp_path)},
    }
    drivers = {
        case: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(JOIN), two_nodes.address],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for case, env in envs.items()
    }
    errors = {
        case: json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])
        for case, p in drivers.items()
    }

    at = f"cannot join Ray at {two_nodes.address}: "
    assert errors["no_mode"].startswith(at + "it requires token authentication; set RAY_AUTH_MODE=token")
    assert errors["wrong_token"].startswith(at + "it rejected the token from RAY_AUTH_TOKEN;")
    assert errors["no_token"].startswith(at + "RAY_AUTH_MODE=token but no token was found;")
    assert all("\n" not in e for e in errors.values())
    assert run_driver(two_nodes, JOIN, two_nodes.address) is None  # the cluster's token joins


# Ray-free parts, in-process


def node(name: str, cpus: float = 2, gpus: float = 0) -> NodeInfo:
    return NodeInfo(name * 8, "10.0.0.1", cpus, gpus)


def test_placer_alternates_nodes_even_with_one_worker():
    placer = Placer([node("a"), node("b")], cpus_per_task=1, max_in_flight=1)
    chosen = []
    for _ in range(4):
        taken = placer.take(io_bound=False)
        assert placer.take(io_bound=False) is None  # one at a time
        chosen.append(taken.node_id[0])
        placer.release(taken, io_bound=False)
    assert chosen == ["a", "b", "a", "b"]


def test_placer_fills_slots_and_counts_io_tasks_apart():
    placer = Placer([node("a", cpus=4), node("b", cpus=2)], cpus_per_task=2, max_in_flight=None)
    taken = [placer.take(io_bound=False) for _ in range(3)]
    assert sorted(n.node_id[0] for n in taken) == ["a", "a", "b"]
    assert placer.take(io_bound=False) is None
    assert placer.take(io_bound=True) is not None


def test_placer_asks_gpus_only_where_there_are_some():
    gpu, cpu = node("g", cpus=8, gpus=1), node("c", cpus=8)
    placer = Placer([gpu, cpu], cpus_per_task=2, max_in_flight=None)
    assert placer.gpus_for(gpu) == 0.25  # four slots share the GPU
    assert placer.gpus_for(cpu) == 0
    assert (
        Placer([node("g", cpus=2, gpus=8)], cpus_per_task=1, max_in_flight=None).gpus_for(node("g", 2, 8))
        == 1
    )


def test_placer_refuses_tasks_bigger_than_every_node():
    with pytest.raises(
        shardex.OptionsError, match="no Ray node has 8 CPUs for a task .largest: 4.; lower cpus_per_task"
    ):
        Placer([node("a", cpus=4)], cpus_per_task=8, max_in_flight=None)


def test_probe_node_in_process(tmp_path):
    with _cluster.marker_file(str(tmp_path)) as marker:
        found = _cluster.probe_node(str(tmp_path), marker, [str(tmp_path / marker)])
        assert found.problem is None and found.versions == _cluster.package_versions()
        assert "another directory" in _cluster.probe_node(str(tmp_path), ".not-the-marker", []).problem
        missing = _cluster.probe_node(str(tmp_path / "missing"), marker, []).problem
        assert missing == f"output directory {tmp_path / 'missing'} does not exist"
    assert os.listdir(tmp_path) == []


def test_probe_error_names_node_and_fix():
    worker = NodeInfo("0123456789abcdef", "10.0.0.2", 4, 0)
    probe = _cluster.NodeProbe("gpu-1", "output directory /out does not exist", {})
    assert _cluster.probe_error(worker, probe, {}) == (
        f"on Ray node gpu-1 10.0.0.2 (node 01234567): output directory /out does not exist; {_cluster.SHARED_FS_FIX}."
    )
    older = _cluster.NodeProbe("gpu-1", None, {"torch": "2.12.0", "shardex": "0.1.0"})
    message = _cluster.probe_error(worker, older, {"torch": "2.13.0", "shardex": "0.1.0"})
    assert message.startswith(
        "on Ray node gpu-1 10.0.0.2 (node 01234567): torch 2.12.0 (here 2.13.0); install shardex"
    )
    assert _cluster.probe_error(worker, older, dict(older.versions)) is None


def test_package_versions_drop_local_tags():
    assert all("+" not in v for v in _cluster.package_versions().values())
    assert _cluster.package_versions()["torch"] == "2.13.0"


def record(label: str, node_id: str, pid: int, start: float, end: float) -> TaskRecord:
    return TaskRecord(
        label, node_id, "host", "10.0.0.1", pid, start, end, 0 if label.startswith("write") else 1, 0
    )


def test_timeline_is_a_chrome_trace_per_node_and_worker(tmp_path):
    records = [
        record("capture trunk", "a" * 8, 11, 100.0, 102.0),
        record("write model-00001-of-00002.data", "b" * 8, 21, 100.5, 101.0),
        record("verify global", "b" * 8, 22, 103.0, 104.5),
    ]
    path = tmp_path / "timeline.json"
    _cluster.write_timeline(records, str(path))

    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["pid"], e["tid"], e["ts"], e["dur"]) for e in spans] == [
        ("capture trunk", "capture", 1, 11, 0, 2_000_000),
        ("write model-00001-of-00002.data", "write", 2, 21, 500_000, 500_000),
        ("verify global", "verify", 2, 22, 3_000_000, 1_500_000),
    ]
    names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e["name"] in ("process_name", "thread_name")
    }
    assert names[(1, 0)] == "node 10.0.0.1 aaaaaaaa (host)" and names[(2, 22)] == "worker 22"
    assert os.listdir(tmp_path) == ["timeline.json"]


def test_summarize_nodes():
    records = [record("capture trunk", "a", 1, 0.0, 2.0), record("verify x", "a", 1, 3.0, 4.0)]
    assert _cluster.summarize_nodes(records) == [
        {
            "node_id": "a",
            "hostname": "host",
            "address": "10.0.0.1",
            "tasks": 2,
            "busy_seconds": 3.0,
            "stages": {"capture": 1, "verify": 1},
        }
    ]


def test_auth_errors_name_the_fix(monkeypatch, tmp_path):
    from ray.exceptions import AuthenticationError

    try:
        try:
            raise AuthenticationError(
                "RPC error: InvalidAuthToken: Authentication token is missing or incorrect"
            )
        except AuthenticationError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from cause
    except ConnectionError as e:
        failure = e
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "set RAY_AUTH_MODE=token" in _ray._auth_error("10.0.0.1:6379", failure)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert f"(RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'} is missing or empty)" in _ray._auth_error(
        "h:1", failure
    )
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert f"rejected the token from RAY_AUTH_TOKEN_PATH={tmp_path / 'token'};" in _ray._auth_error(
        "h:1", failure
    )
    assert _ray._auth_error("h:1", ConnectionError("connection refused")) is None
