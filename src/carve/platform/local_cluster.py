"""A Ray cluster of several nodes on one machine, each started with `ray start` (for tests, benchmarks, trying a deployment).

Every node is one `ray start --block` process in a process group of its own,
with its own CPUs and custom resources, all on 127.0.0.1. Stopping a node
(SIGTERM to its group) stops its Ray processes; killing its raylet (SIGKILL) is
what the loss of a machine looks like to the rest of the cluster: the GCS marks
the node dead and its actors with it. The cluster holds one driver connection
(``ray.init``) for looking at nodes and actors. Linux only (/proc); run it under
the offline wrapper where there is one, as everything that starts Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from carve.platform.app import HEAD_NODE_RESOURCE

START_TIMEOUT_S = 90.0
READY_LINE = "Ray runtime started"  # what `ray start` prints once its node runs
# Loopback only: every process of the cluster (nodes, this driver, `carve serve --address`) runs without Ray's
# token authentication; with it, a driver whose cached token differs from ~/.ray/auth_token's was refused.
AUTH_MODE_ENV = "RAY_AUTH_MODE"


class ClusterError(RuntimeError):
    """A node did not start (its log's last lines say why) or the cluster is not as expected."""


@dataclass
class LocalNode:
    """One node: its `ray start --block` process, its Ray node id, its log."""

    process: subprocess.Popen
    node_id: str
    head: bool
    log: Path

    def raylet_pid(self) -> int:
        """The node's raylet: a child of its `ray start` process."""
        for pid, (parent, name) in _processes().items():
            if parent == self.process.pid and name == "raylet":
                return pid
        raise ClusterError(f"node {self.node_id[:8]} has no raylet (its log: {self.log})")

    def kill(self, everything: bool = False) -> None:
        """Lose the node: SIGKILL its raylet (its workers notice within seconds and exit; `ray start --block` stops
        the rest), or with ``everything`` every process of the node at once, as when its machine goes down."""
        if everything:  # Ray starts its workers in sessions of their own: every descendant, not the process group
            for pid in [self.process.pid, *_descendants(self.process.pid)]:
                _kill(pid)
        else:
            os.kill(self.raylet_pid(), signal.SIGKILL)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every Ray process of this node: SIGTERM to its group, SIGKILL to what is left after ``timeout_s``."""
        left = _descendants(self.process.pid)
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)
        for pid in left:  # workers the node started in sessions of their own and left behind
            _kill(pid)
        self.process.wait()


class LocalCluster:
    """A head node and worker nodes on this machine; ``address`` is what `carve serve --address` and ``ray.init`` take."""

    def __init__(self, temp_dir: Path, object_store_mb: int = 256):
        # Ray's socket paths live under the temp dir and must stay short (107 bytes): give a short folder.
        self.temp_dir = Path(temp_dir)
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[LocalNode] = []
        self._saved_auth_mode: Optional[tuple[Optional[str]]] = None  # set while the cluster has changed RAY_AUTH_MODE

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def head(self) -> LocalNode:
        return self.nodes[0]

    def start_head(self, num_cpus: float, resources: Optional[dict[str, float]] = None) -> LocalNode:
        """Start the head node and connect this process to it as a driver."""
        import ray

        if self.nodes:
            raise ClusterError("the head node is already started")
        self._saved_auth_mode = (os.environ.get(AUTH_MODE_ENV),)
        _set_auth_mode("disabled")
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        args = ["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats"]
        process, log = self._start("head", args, num_cpus, resources)
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in log.read_text(errors="replace"):  # connect only once `ray start` says the node runs
            if process.poll() is not None or time.monotonic() > deadline:
                _stop_process(process)
                raise ClusterError(f"the head node did not start: {_tail(log)}")
            time.sleep(0.5)
        try:
            ray.init(address=self.address, log_to_driver=False)
        except ConnectionError as exc:
            _stop_process(process)
            raise ClusterError(f"cannot connect to the head node ({exc}): {_tail(log)}") from None
        node = LocalNode(process, self._wait_for_new_node(process, log, known=set()), True, log)
        self.nodes.append(node)
        return node

    def add_worker(self, num_cpus: float, resources: Optional[dict[str, float]] = None) -> LocalNode:
        """Start a worker node joined to the head; returns once the cluster sees it alive."""
        if not self.nodes:
            raise ClusterError("start the head node first")
        known = {n.node_id for n in self.nodes}
        process, log = self._start(f"worker{len(self.nodes)}", [f"--address={self.address}"], num_cpus, resources)
        node = LocalNode(process, self._wait_for_new_node(process, log, known), False, log)
        self.nodes.append(node)
        return node

    def alive(self) -> dict[str, bool]:
        """Node id -> alive, as the GCS sees it."""
        import ray

        return {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}

    def stop(self) -> None:
        """Disconnect the driver, then stop the workers and the head."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        if self._saved_auth_mode is not None:
            _set_auth_mode(self._saved_auth_mode[0])
            self._saved_auth_mode = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _start(self, name: str, args: list[str], num_cpus: float, resources: Optional[dict[str, float]]) -> tuple[subprocess.Popen, Path]:
        import json

        log = self.temp_dir / f"{name}.log"
        ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        command = [
            ray_cli, "start", "--block", *args, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus:g}", "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}", f"--resources={json.dumps(resources or {})}",
        ]
        with open(log, "w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return process, log

    def _wait_for_new_node(self, process: subprocess.Popen, log: Path, known: set[str]) -> str:
        import ray

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ClusterError(f"the node exited while starting: {_tail(log)}")
            fresh = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in known]
            if fresh:
                head = [n for n in fresh if HEAD_NODE_RESOURCE in n["Resources"]]
                return (head or fresh)[0]["NodeID"]
            time.sleep(0.5)
        _stop_process(process)
        raise ClusterError(f"no new node joined within {START_TIMEOUT_S:.0f} s: {_tail(log)}")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process, from /proc."""
    out: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        out[int(entry.name)] = (parent, name)
    return out


def _set_auth_mode(mode: Optional[str]) -> None:
    """Ray's token authentication for this process and the ones it starts (None: Ray's default)."""
    from ray._raylet import Config

    if mode is None:
        os.environ.pop(AUTH_MODE_ENV, None)
    else:
        os.environ[AUTH_MODE_ENV] = mode
    Config.initialize("")  # Ray caches its config: read the mode again


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in _processes().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_process(process: subprocess.Popen) -> None:
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may still take it before it is bound again)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
