"""The cluster recipes of cluster/: each parses, has what a cluster for shardex needs (token
authentication, GPU workers, a shared filesystem at one path on every node, shardex installed),
and installs exactly the versions pyproject.toml pins."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement

from tests.test_cluster import REPO, load_local_cluster

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
CLUSTER = REPO / "cluster"
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[0-9][^\s\"';]*)")


def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def pyproject_pins() -> dict[str, str]:
    """name -> version of every ``==`` pin among the package's dependencies."""
    pins = {}
    for line in project()["dependencies"]:
        requirement = Requirement(line)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[requirement.name.lower()] = exact[0]
    return pins


def installed_pins(commands: str) -> dict[str, str]:
    return {m["name"].lower(): m["version"] for m in PIN.finditer(commands)}


def wheel_name() -> str:
    return f"shardex-{project()['version']}-py3-none-any.whl"


def assert_installs_the_pins(commands: str) -> None:
    """Every pin of pyproject.toml is installed at its version, no other version of them, and
    shardex itself from the wheel of this version."""
    expected = pyproject_pins()
    assert {"torch", "ray", "onnxscript", "onnx-ir"} <= set(expected)
    assert {n: v for n, v in installed_pins(commands).items() if n in expected} == expected
    assert f"{wheel_name()}[hf]" in commands


def test_ray_up_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks, against Ray's own schema

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = config["head_node_type"]
    gpu_workers = [
        t for n, t in types.items() if n != head and t["node_config"]["InstanceType"].startswith("g5.")
    ]
    assert gpu_workers and all(t["max_workers"] >= 1 for t in gpu_workers)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), config[key]
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    setup = "\n".join(config["setup_commands"])
    assert " /shared" in setup and "mount -t nfs4" in setup
    assert_installs_the_pins(setup)


def kuberay() -> tuple[dict, dict]:
    documents = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())}
    return documents["RayCluster"], documents["PersistentVolumeClaim"]


def test_kuberay_manifest():
    cluster, claim = kuberay()
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == pyproject_pins()["ray"]
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert "ReadWriteMany" in claim["spec"]["accessModes"]

    head = cluster["spec"]["headGroupSpec"]
    workers = cluster["spec"]["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]["spec"], *(w["template"]["spec"] for w in workers)]
    mounts = set()
    for pod in pods:
        volumes = {
            v["name"]
            for v in pod["volumes"]
            if v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        }
        (container,) = pod["containers"]
        mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
        assert container["image"] == f"REGISTRY/shardex-ray:{project()['version']}"
    assert mounts == {"/shared"}, "every pod mounts the shared volume at one path"
    assert all(
        w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for w in workers
    )


def test_kuberay_image():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{pyproject_pins()['ray']}-") and base.endswith("-gpu")
    assert_installs_the_pins(dockerfile)


@pytest.fixture
def local_cluster_module():
    return load_local_cluster()


def test_local_cluster_commands(local_cluster_module):
    head = local_cluster_module.node_command(
        "node_0", head_address=None, num_cpus=1, num_gpus=0, temp_dir="/tmp/a"
    )
    worker = local_cluster_module.node_command(
        "node_1", head_address="10.0.0.1:6379", num_cpus=2, num_gpus=1, temp_dir="/tmp/b"
    )

    def options(command):
        return dict(
            arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--") and "=" in arg
        )

    assert head[:4] == [sys.executable, "-m", "ray.scripts.scripts", "start"] and "--head" in head
    assert "--block" in head and "--block" in worker and "--head" not in worker
    assert options(worker)["address"] == "10.0.0.1:6379"
    assert options(head)["resources"] == '{"node_0": 1}' and options(worker)["num-cpus"] == "2"
    assert options(head)["num-gpus"] == "0" and options(worker)["num-gpus"] == "1"
    ports = [v for c in (head, worker) for k, v in options(c).items() if k.endswith("port") and v != "0"]
    assert (
        len(ports)
        == len(set(ports))
        == 2 * len(local_cluster_module.PORT_OPTIONS) + len(local_cluster_module.HEAD_PORT_OPTIONS)
    )


def test_local_cluster_environment(local_cluster_module, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    cluster = local_cluster_module.LocalCluster(workers=1)
    try:
        env = cluster.driver_env
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env  # it would win over the path
        assert env["RAY_AUTH_TOKEN_PATH"] == f"{cluster.root}/auth_token"
        assert (
            len(f"{cluster.root}/node_0/session_2026-01-01_00-00-00_000000_12345/sockets/plasma_store") < 107
        )
    finally:
        cluster.stop()


def test_local_cluster_cli_help():
    result = subprocess.run(
        [sys.executable, str(CLUSTER / "local_cluster.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--workers" in result.stdout and "--cpus-per-node" in result.stdout
