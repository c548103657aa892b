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
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.ray

KEY = "sk-serving-cli-test"


def served_url(process: subprocess.Popen, seen: list[str]) -> str:
    """The address `carve serve --port 0` prints once it serves; the lines read go to ``seen``."""
    assert process.stdout is not None
    for line in process.stdout:  # ends when the process exits
        seen.append(line)
        if found := re.match(r"serving on (http://\S+)/v1", line):
            return found.group(1)
    raise AssertionError(f"carve serve exited early ({process.wait()}): {''.join(seen)}")


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\S* (\S+)$", text, flags=re.M))


@pytest.mark.timeout(480)
def test_carve_serve_two_replicas_keyed_locality_and_sigterm(tmp_path: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    from carve.adapters.registry import Registry

    registry = Registry(tmp_path / "registry")
    for name in ("alpha", "beta"):
        registry.add(tiny_adapters[name], name, base=str(tiny_model_dir))
    env = {**os.environ, "CARVE_HOME": str(tmp_path), "CARVE_REGISTRY": str(registry.root), "CARVE_API_KEY": KEY, "CARVE_ADMIN_TOKEN": "admin-token-cli"}
    process = subprocess.Popen(
        [sys.executable, "-m", "carve.cli.app", "serve", "--model", str(tiny_model_dir), "--port", "0",
         "--replicas", "2", "--max-adapters", "1", "--engine-cpus", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen: list[str] = []
    try:
        url = served_url(process, seen)
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
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
    output = "".join(seen) + output
    assert process.returncode == 0, output
    assert "serving on" in output and output.rstrip().endswith("stopped")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)
