"""Start the Carve server: on a local Ray started here (the embedded default) or on an existing cluster.

``start_local_server`` / ``stop_local_server`` are what `carve serve`, the
demo and the tests call; ``serve_forever`` adds clean shutdown on Ctrl-C and
SIGTERM. Before deploying, the database is reached once where the server will
run (an unreachable one fails here, not in every replica), and a SQLite file
on a network filesystem is refused when the cluster has several nodes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from carve.engine.models import DEFAULT_MODEL
from carve.platform.config import ServeConfig

if TYPE_CHECKING:  # pragma: no cover
    from carve.common.database import ClusterAdvice

_started_ray = False


class PortTaken(RuntimeError):
    """Serve's HTTP proxy could not bind its address: another process holds the port."""


@dataclass(frozen=True)
class ServerHandle:
    """A running server: where to reach it and with which settings."""

    url: str
    config: ServeConfig
    local_ray: bool
    warnings: tuple[str, ...] = field(default=())  # about the deployment, for the operator (e.g. SQLite on several nodes)


def make_config(
    model: str,
    registry_root: Optional[Path] = None,
    max_adapters: int = 8,
    replicas: int = 1,
    **settings: Any,
) -> ServeConfig:
    return ServeConfig.from_env(model=model, registry_root=registry_root, max_adapters=max_adapters, replicas=replicas, **settings)


def start_local_server(
    model: str = DEFAULT_MODEL,
    registry_root: Optional[Path] = None,
    port: int = 8000,
    max_adapters: int = 8,
    *,
    host: str = "127.0.0.1",
    replicas: int = 1,
    num_cpus: Optional[int] = None,
    config: Optional[ServeConfig] = None,
    **settings: Any,
) -> ServerHandle:
    """Start a local Ray, deploy Carve on ``host:port``, and return once it answers.

    ``port=0`` takes a free port once Ray is up (Ray's own processes bind
    ephemeral ports as they start, so a port picked earlier can be gone), and
    another one if the proxy still loses it. A failed start stops what it started.
    """
    global _started_ray
    import ray

    config = config or make_config(model, registry_root, max_adapters, replicas, **settings)
    warnings = _judged(database_check(config, alive_nodes() if ray.is_initialized() else 1))  # before starting anything
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        _started_ray = True
    try:
        if port == 0:
            return _deploy_on_a_free_port(config, host, warnings)
        return _deploy(config, host, port, local_ray=True, warnings=warnings)
    except BaseException:
        stop_local_server()
        raise


def _deploy_on_a_free_port(config: ServeConfig, host: str, warnings: tuple[str, ...], attempts: int = 3) -> ServerHandle:
    from ray import serve

    from carve.platform.local_cluster import free_port

    for _ in range(attempts - 1):
        try:
            return _deploy(config, host, free_port(host), local_ray=True, warnings=warnings)
        except PortTaken:
            serve.shutdown()
    return _deploy(config, host, free_port(host), local_ray=True, warnings=warnings)


def deploy_to_cluster(address: str, config: ServeConfig, host: str = "0.0.0.0", port: int = 8000) -> ServerHandle:
    """Connect to an existing Ray cluster and deploy (or update) the Carve application there."""
    import ray

    ray.init(address=address, log_to_driver=False)
    # judged where the replicas run: the cluster's network and mounts, not this client's
    advice = ray.get(ray.remote(num_cpus=0)(database_check).remote(config, alive_nodes()))
    return _deploy(config, host, port, local_ray=False, warnings=_judged(advice))


def _deploy(config: ServeConfig, host: str, port: int, local_ray: bool, warnings: tuple[str, ...]) -> ServerHandle:
    from ray import serve

    from carve.platform.app import APP_NAME, build_app

    try:
        serve.start(proxy_location=config.proxy_location, http_options={"host": host, "port": port})
    except Exception as error:  # Ray wraps the proxy's failure in a RayTaskError
        if "Failed to bind" in str(error):
            raise PortTaken(f"port {port} on {host} is taken by another process: pass another port, or 0 for any free one") from None
        raise
    serve.run(build_app(config), name=APP_NAME, route_prefix=config.route_prefix, blocking=False)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return ServerHandle(f"http://{shown_host}:{port}", config, local_ray, warnings)


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def database_check(config: ServeConfig, nodes: int) -> "Optional[ClusterAdvice]":
    """On this node: whether the server's database can be reached and serve ``nodes`` nodes (carve.common.database.check_for_cluster)."""
    from carve.common.database import check_for_cluster

    return check_for_cluster(config.database(), nodes)


def _judged(advice: "Optional[ClusterAdvice]") -> tuple[str, ...]:
    """DatabaseError for a refusal; else the warnings to show the operator."""
    from carve.common.database import DatabaseError

    if advice is not None and advice.refuse:
        raise DatabaseError(advice.reason)
    return (advice.reason,) if advice is not None else ()


def stop_local_server() -> None:
    """Shut Serve down and stop the Ray this module started (a cluster we joined keeps running)."""
    global _started_ray
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if _started_ray:
                ray.shutdown()
                _started_ray = False


def serve_forever(handle: ServerHandle, poll_s: float = 0.5) -> None:
    """Block until SIGINT or SIGTERM, then stop the server cleanly."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set():
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_local_server()
