"""Two Ray nodes on this machine (`ray start`), Carve deployed onto them with `carve serve --address`, the worker node lost.

Runs benchmarks/cluster_faults.py's scenario on the tiny model with a real PostgreSQL registry: traffic and jobs on
both nodes, the worker's raylet SIGKILLed under load, only what that node held lost, its job resumed on the head.
Run under the offline wrapper.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cluster_faults import run_fault_scenario, summary  # noqa: E402
from test_jobs import CORPUS, SEEDS, SETTINGS  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.cluster]

# long enough that both jobs still run when the worker dies: many short epochs, a checkpoint after every step
SLOW_JOB = {
    "seeds": SEEDS, "domain": {"name": "biomedical"}, "corpus": {"jsonl": CORPUS},
    "settings": {**SETTINGS, "instances": "corpus", "corpus_per_task": 2, "training": {**SETTINGS["training"], "epochs": 40}},
}


def test_a_lost_worker_node_costs_only_what_it_held(tiny_model_dir: Path, tiny_adapters: dict[str, Path], postgres_url: str, tmp_path: Path) -> None:
    adapters = {name: tiny_adapters[name] for name in ("alpha", "beta")}
    prompts = [json.loads(line)["input"] for line in SEEDS.splitlines()]
    report = run_fault_scenario(
        str(tiny_model_dir), adapters, postgres_url, tmp_path, SLOW_JOB, prompts, clients=4, max_tokens=300, before_s=4.0, after_s=4.0, timeout_s=300,
    )
    print(summary(report, 4.0, 4.0))
    # before the fault: one engine replica, one adapter and one job on each node
    assert sorted(report.replicas_before.values()) == ["head", "worker"]
    assert sorted(report.adapter_nodes.values()) == ["head", "worker"]  # each uploaded through the head's gateway
    assert sorted(report.job_nodes.values()) == ["head", "worker"] and report.job_nodes[report.victim_job] == "worker"
    # the fault: the worker held requests; only those may fail, each with an error (none hung: every request ended)
    assert report.in_flight_at_kill >= 1
    assert report.lost <= report.in_flight_at_kill, [r.outcome.error for r in report.requests if not r.outcome.completed]
    assert all(r.outcome.error for r in report.requests if not r.outcome.completed)
    kill, recovered = report.kill_at, report.recovered_at
    assert recovered is not None and report.rate(recovered, recovered + 4.0) > 0
    assert report.rate(kill, recovered) > 0  # traffic went on on the head while Serve replaced the replica
    # the registry and its files intact; the worker's job resumed from its run folder on the head
    assert report.job_resumed, (report.victim_status, report.victim_attempt, report.victim_resumed_on)
    assert set(report.registered_after) >= {"alpha", "beta", "job-0", "job-1"}
    assert set(report.served_after.values()) == {200}, report.served_after


def test_carve_serve_onto_two_nodes_warns_that_a_local_sqlite_file_is_not_shared(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import tempfile

    from cluster_faults import deploy_command

    from carve.platform.local_cluster import LocalCluster, free_port

    with LocalCluster(Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))) as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_worker(num_cpus=1)
        command = deploy_command(cluster.address, str(tiny_model_dir), tmp_path / "registry", None, free_port(), ["--engine-cpus", "0", "--replicas", "1"])
        env = {**os.environ, "CARVE_HOME": str(tmp_path / "home"), "CARVE_ADMIN_TOKEN": "cluster-test-admin-token"}
        env.pop("CARVE_DATABASE_URL", None)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: the SQLite database" in done.stderr and "the Ray cluster has 2 nodes" in done.stderr and "use PostgreSQL" in done.stderr
