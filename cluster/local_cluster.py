"""A Ray cluster of several nodes on this machine: a head and N worker nodes, each its own
``ray start --block`` process, with token authentication, its own ports and temp directory, and a
custom resource naming it (``{"node_0": 1}`` on the head, ``{"node_1": 1}``, ... on workers).

It is what shardex's cluster tests run on, and a way to try a multi-node export on a laptop::

    python cluster/local_cluster.py --workers 1                  # prints the address; Ctrl-C stops
    python cluster/local_cluster.py --workers 1 -- shardex export CKPT OUT   # runs it there, then stops

Every node runs in a process group of its own, and stopping sends SIGTERM to each node's
``ray start`` process, then SIGKILL to whatever is left of that group: exactly the processes
started here. (``ray stop`` would kill every Ray process on the machine, by name.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

OBJECT_STORE_BYTES = 256 * 2**20  # per node; the nodes share this machine's memory
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
# Printed by `ray start --block` once the node runs and the head's address file is written.
READY_LINE = "This command will now block forever"
# Ray's per-node ports that default to fixed numbers; two nodes on one machine need their own.
PORT_OPTIONS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
HEAD_PORT_OPTIONS = ("--port", "--ray-client-server-port", "--dashboard-port")


_HANDED_OUT: set[int] = set()  # ports `free_ports` gave before, in this process


def free_ports(count: int) -> list[int]:
    """`count` distinct ports no process listens on now, none handed out before by this process
    (a node binds some of its ports only once running, so a port given to the head could
    still look free when the next node's are chosen). Another process could take one before
    Ray does: unlikely. The sockets stay open until all are chosen, so none comes twice."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            s = stack.enter_context(socket.socket())
            s.bind(("", 0))
            if (port := s.getsockname()[1]) not in _HANDED_OUT:
                ports.append(port)
                _HANDED_OUT.add(port)
        return ports


def node_command(
    name: str, *, head_address: str | None, num_cpus: int, num_gpus: int, temp_dir: str
) -> list[str]:
    """The ``ray start`` command of one node: the head when `head_address` is None."""
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]
    options = PORT_OPTIONS + (HEAD_PORT_OPTIONS if head_address is None else ())
    command += [f"{option}={port}" for option, port in zip(options, free_ports(len(options)))]
    if head_address is None:
        command += ["--head", "--include-dashboard=false"]
    else:
        command.append(f"--address={head_address}")
    return command + [
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",  # declared, never detected: nodes on one machine would all claim its GPUs
        f'--resources={{"{name}": 1}}',
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--log-style=record",
        "--log-color=false",
    ]


class LocalCluster:
    """Start with `start()` (or ``with``), join at `address` with `driver_env`, `stop()` at the end.

    The token lives in the cluster's own directory (passed as RAY_AUTH_TOKEN_PATH), so this never
    reads or writes ``~/.ray/auth_token``. The directory is short and under /tmp: Ray's socket
    paths inside it must stay under the 107-character limit of Unix sockets.
    """

    def __init__(self, *, workers: int = 1, cpus_per_node: int = 1, worker_gpus: int = 0) -> None:
        if workers < 0 or cpus_per_node < 1 or worker_gpus < 0:
            raise ValueError(
                "need workers >= 0, cpus_per_node >= 1 and worker_gpus >= 0, "
                f"got {workers}, {cpus_per_node} and {worker_gpus}."
            )
        self.workers, self.cpus_per_node, self.worker_gpus = workers, cpus_per_node, worker_gpus
        self.root = tempfile.mkdtemp(prefix="shardex-rc-", dir="/tmp")
        self.token_path = os.path.join(self.root, "auth_token")
        self.processes: list[subprocess.Popen] = []
        self.address = ""

    @property
    def node_env(self) -> dict[str, str]:
        """The environment of every node: token auth with this cluster's token, no draining on
        SIGTERM (Ray's default waits 30 s for work to move elsewhere)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        return env | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }

    @property
    def driver_env(self) -> dict[str, str]:
        """The environment a driver (``shardex export``) joins this cluster with."""
        return self.node_env | {"RAY_ADDRESS": self.address}

    def start(self) -> LocalCluster:
        with open(self.token_path, "x") as f:
            f.write(secrets.token_hex(32))
        os.chmod(self.token_path, 0o600)
        self.add_node()
        with open(os.path.join(self.root, "node_0", "ray_current_cluster")) as f:
            self.address = f.read().strip()
        for _ in range(self.workers):
            self.add_node()
        return self

    def add_node(self, *, num_gpus: int | None = None, prefix: Sequence[str] = ()) -> str:
        """Start one more node (the head first) and wait until it runs; returns its resource name.
        It declares `num_gpus` GPUs (default: none on the head, `worker_gpus` on workers);
        `prefix` wraps the command, e.g. to run the node in a mount namespace of its own."""
        name = f"node_{len(self.processes)}"
        if num_gpus is None:
            num_gpus = self.worker_gpus if self.processes else 0
        command = node_command(
            name,
            head_address=self.address or None,
            num_cpus=self.cpus_per_node,
            num_gpus=num_gpus,
            temp_dir=os.path.join(self.root, name),
        )
        log_path = os.path.join(self.root, f"{name}.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [*prefix, *command],
                env=self.node_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, nothing else with it
            )
        self.processes.append(process)
        _wait_ready(process, log_path)
        return name

    def stop(self) -> None:
        """Stop every node started here, workers first, then remove the cluster's directory."""
        while self.processes:
            _stop_group(self.processes.pop())
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_ready(process: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(log_path) as f:
            log = f.read()
        if READY_LINE in log:
            return
        if process.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {process.returncode}; its log {log_path} ends: {log[-2000:]}"
            )
        time.sleep(0.2)
    raise RuntimeError(
        f"ray start did not report '{READY_LINE}' within {START_TIMEOUT_S:.0f}s; see {log_path}."
    )


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the node's ``ray start`` (it stops its node's processes), then SIGKILL what is
    left of its process group. The leader is reaped only after that, so the group id cannot have
    been reused by anyone else's processes."""
    if process.poll() is None:
        process.terminate()
        _wait_exited(process.pid, STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _wait_exited(pid: int, timeout: float) -> None:
    """Wait for `pid` to exit without reaping it (it stays a zombie, holding its id)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each node offers (default 1)")
    parser.add_argument(
        "--worker-gpus", type=int, default=0, help="GPUs each worker node declares (default 0)"
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="after --: a command to run against the cluster"
    )
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the nodes on SIGTERM too
    cluster = LocalCluster(
        workers=options.workers, cpus_per_node=options.cpus_per_node, worker_gpus=options.worker_gpus
    )
    with cluster:
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            print(f"export {name}={cluster.driver_env[name]}", flush=True)
        if command:
            return subprocess.call(command, env=cluster.driver_env)
        print(f"{options.workers + 1} nodes running; Ctrl-C stops them.", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
