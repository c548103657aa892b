"""Starting the local server: a port already taken fails cleanly, and ``port=0`` finds another one.

Run under the offline wrapper (../shared/tools/offline): it starts a real local Ray.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from live_server import carve_home

pytestmark = pytest.mark.ray


def test_a_taken_port_stops_what_started_and_port_zero_takes_another(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from carve.platform import launcher, local_cluster

    settings = dict(num_cpus=2, engine_num_cpus=0, max_adapters=1)
    with socket.socket() as taken, carve_home(tmp_path):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(launcher.PortTaken, match=f"port {port} on 127.0.0.1 is taken"):
            launcher.start_local_server(str(tiny_model_dir), tmp_path / "registry", port, **settings)
        assert not ray.is_initialized()  # no Ray or Serve left behind to confuse the next start

        # As when one of Ray's own processes takes the port between choosing and binding it: the next choice is used.
        offered = [port]
        free_port = local_cluster.free_port
        monkeypatch.setattr(local_cluster, "free_port", lambda host: offered.pop() if offered else free_port(host))
        handle = launcher.start_local_server(str(tiny_model_dir), tmp_path / "registry", 0, **settings)
        try:
            assert not offered and handle.url != f"http://127.0.0.1:{port}"
            assert httpx.get(handle.url + "/healthz", timeout=30).status_code == 200
        finally:
            launcher.stop_local_server()
    assert not ray.is_initialized()
