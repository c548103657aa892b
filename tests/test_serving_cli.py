"""`carve serve` as a user runs it: a subprocess with its own local Ray, two replicas, keyed
inference, adapter locality across replicas, and a clean stop on SIGTERM.

Run under the offline wrapper:
    ../shared/tools/offline .venv/bin/python -m pytest -q tests/test_serving_cli.py
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from carve.platform.local_cluster import free_port

pytestmark = pytest.mark.ray

KEY = "sk-serving-cli-test"


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"carve serve exited early ({process.returncode}): {process.stdout.read() if process.stdout else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("carve serve did not become healthy")


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\S* (\S+)$", text, flags=re.M))


def test_carve_serve_two_replicas_keyed_locality_and_sigterm(tmp_path: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    from carve.adapters.registry import Registry

    registry = Registry(tmp_path / "registry")
    for name in ("alpha", "beta"):
        registry.add(tiny_adapters[name], name, base=str(tiny_model_dir))
    port = free_port()
    env = {**os.environ, "CARVE_HOME": str(tmp_path), "CARVE_REGISTRY": str(registry.root), "CARVE_API_KEY": KEY, "CARVE_ADMIN_TOKEN": "admin-token-cli"}
    process = subprocess.Popen(
        [sys.executable, "-m", "carve.cli.app", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--replicas", "2", "--max-adapters", "1", "--engine-cpus", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        body = {"model": "alpha", "prompt": "The patient", "max_tokens": 4, "temperature": 0}
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/completions", json=body).status_code == 401
            assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/v1/models").status_code == 401
            keyed = {"Authorization": f"Bearer {KEY}"}
            # Two adapters, two replicas holding one adapter each: with locality, no adapter is ever evicted.
            for model in ["alpha", "beta"] * 5:
                response = client.post("/v1/completions", json={**body, "model": model}, headers=keyed)
                assert response.status_code == 200, response.text
            metrics = client.get("/metrics").text
        assert metric(metrics, "carve_adapter_loads_total") == 2
        assert metric(metrics, "carve_adapter_evictions_total") == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "serving on" in output and output.rstrip().endswith("stopped")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)
