"""A node lost under load: two Ray nodes on this machine, Carve deployed onto them, the worker node killed (issue 18).

The cluster: a head and a worker node, each started with `ray start` on
127.0.0.1 with 2 CPUs (carve.platform.local_cluster); the registry and the
jobs on a PostgreSQL server; the adapter files and run folders in one folder
both nodes see. `carve serve --address` deploys two engine replicas (0.5 CPU
each: Serve spreads them, one per node), one adapter slot per replica, and the
gateway with the one HTTP proxy on the head.

1. Two adapters are uploaded through the gateway and asked for in turn: the
   router gives each its own replica, so each node serves one of them.
2. Two specialization jobs are submitted over HTTP (1 CPU each): each runs on
   the node that has room, one per node.
3. ``--clients`` clients send requests in a closed loop, each to one
   adapter (so each node always holds requests), half of them streamed. After ``--before-s`` seconds the
   worker node's raylet is SIGKILLed while its job runs (``--fault node``:
   every process of the node at once, as when its machine goes down).
4. Measured: requests/s completed before, during and after the fault
   (recovery: until Serve runs two engine replicas again, both on the head);
   the requests the clients lost against those in flight on the killed node
   at the kill (the requests for the adapter the router kept there); how long
   its replica process outlived its raylet; the engine calls the gateway sent
   again and the streams cut after their first tokens; the job of the killed
   node resumed from its run folder on the head.

Run under the offline wrapper (it starts Ray and a PostgreSQL server):
    ../shared/tools/offline .venv/bin/python benchmarks/cluster_faults.py [--model smollm2-135m-instruct]

Last line: ``RESULT lost=<requests not completed> in_flight_at_kill=<requests the killed node held>
recovery_s=<kill to two live replicas> job_resumed=<0|1>``. Targets: lost <= in_flight_at_kill (only what the
killed node held may fail, each with an error, never a hang), job_resumed = 1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).parent))

from common import OUT_DIR, make_random_adapters  # noqa: E402
from serving_load import Outcome, Request, send  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "cluster-fault-admin-token"
ENGINE_ACTOR = ":CarveEngine"


@dataclass
class Timed:
    """One request: when it started and ended (perf_counter), what its client saw."""

    start: float
    end: float
    adapter: str
    outcome: Outcome


@dataclass
class FaultReport:
    replicas_before: dict[str, str]  # engine replica id -> "head" | "worker"
    adapter_nodes: dict[str, str]  # adapter -> the node whose replica served it first
    job_nodes: dict[str, str]  # job id -> node it ran on before the fault
    victim_job: str
    victim_resumed_on: Optional[str]
    victim_status: str
    victim_attempt: int
    requests: list[Timed] = field(default_factory=list)
    kill_at: float = 0.0
    recovered_at: Optional[float] = None
    resent: float = 0.0  # engine calls the gateway sent again after the kill (their replica lost)
    cut_streams: int = 0  # streams that ended with replica_lost after their first tokens
    replica_outlived_s: float = float("nan")  # how long the killed node's replica process ran on after its raylet died
    registered_after: list[str] = field(default_factory=list)
    served_after: dict[str, int] = field(default_factory=dict)  # tag -> HTTP status of one request after recovery

    @property
    def lost(self) -> int:
        return sum(1 for r in self.requests if not r.outcome.completed)

    @property
    def in_flight_at_kill(self) -> int:
        """Requests the killed node's replica held at the kill: those in flight for the adapter the router kept there."""
        on_worker = {name for name, node in self.adapter_nodes.items() if node == "worker"}
        return sum(1 for r in self.requests if r.start <= self.kill_at < r.end and r.adapter in on_worker)

    def in_flight_by_adapter(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.requests:
            if r.start <= self.kill_at < r.end:
                counts[r.adapter] = counts.get(r.adapter, 0) + 1
        return counts

    @property
    def recovery_s(self) -> float:
        return (self.recovered_at - self.kill_at) if self.recovered_at is not None else float("nan")

    @property
    def job_resumed(self) -> bool:
        return self.victim_status == "succeeded" and self.victim_attempt >= 2 and self.victim_resumed_on == "head"

    def figures(self, before_s: float, after_s: float) -> dict[str, Any]:
        kill, recovered = self.kill_at, self.recovered_at or self.kill_at
        return {
            "sent": len(self.requests), "lost": self.lost, "in_flight_at_kill": self.in_flight_at_kill, "resent": self.resent,
            "cut_streams": self.cut_streams, "replica_outlived_s": self.replica_outlived_s, "recovery_s": self.recovery_s,
            "longest_gap_s": self.longest_gap_s(), "rps_before": self.rate(kill - before_s, kill), "rps_during": self.rate(kill, recovered),
            "rps_after": self.rate(recovered, recovered + after_s), "job_resumed": self.job_resumed, "victim_attempt": self.victim_attempt,
            "replicas_before": self.replicas_before, "adapter_nodes": self.adapter_nodes, "job_nodes": self.job_nodes,
            "registered_after": self.registered_after, "served_after": self.served_after,
        }

    def rate(self, start: float, end: float) -> float:
        """Requests completed per second in [start, end)."""
        done = sum(1 for r in self.requests if r.outcome.completed and start <= r.end < end)
        return done / (end - start) if end > start else float("nan")

    def longest_gap_s(self) -> float:
        """The longest time after the kill without a completed request."""
        ends = sorted(r.end for r in self.requests if r.outcome.completed and r.end >= self.kill_at)
        points = [self.kill_at, *ends]
        return max((b - a for a, b in zip(points, points[1:])), default=float("nan"))


# -- the scenario ---------------------------------------------------------------------------------


def run_fault_scenario(
    model: str, adapters: dict[str, Path], database_url: str, work: Path, job: dict[str, Any], prompts: list[str], *,
    clients: int = 4, max_tokens: int = 32, before_s: float = 10.0, after_s: float = 10.0, timeout_s: float = 600.0,
    fault: str = "raylet", log: Callable[[str], None] = print,
) -> FaultReport:
    """Deploy onto a fresh two-node cluster, kill the worker under load, and measure (see the module docstring)."""
    import httpx

    from carve.platform.local_cluster import LocalCluster

    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp")))
    try:
        head = cluster.start_head(num_cpus=2)
        worker = cluster.add_worker(num_cpus=2)
        nodes = {head.node_id: "head", worker.node_id: "worker"}
        log(f"cluster at {cluster.address}: head {head.node_id[:8]}, worker {worker.node_id[:8]}")
        port = deploy(cluster.address, model, work / "registry", database_url, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            replicas = wait_for(lambda: placed_replicas(nodes, 2), timeout_s, "two engine replicas")
            log(f"engine replicas: {replicas}")
            names = list(adapters)
            for name in names:
                upload(client, name, adapters[name])
            time.sleep(5)  # the router learns each replica's adapter slots (routing stats every 2 s)
            adapter_nodes = {}
            for name in names:
                before = replica_jobs(client)
                assert complete(client, name, prompts[0], max_tokens) == 200
                adapter_nodes[name] = next(replicas[r] for r, n in replica_jobs(client).items() if n > before.get(r, 0))
            log(f"adapters served by: {adapter_nodes}")

            job_ids = [submit(client, {**job, "tag": f"job-{i}"}) for i in range(2)]
            job_nodes = wait_for(lambda: running_jobs(client, job_ids, nodes), timeout_s, "both jobs running")
            victim = next(j for j, n in job_nodes.items() if n == "worker")
            log(f"jobs on: {job_nodes}")

            report = FaultReport(replicas, adapter_nodes, job_nodes, victim, None, "", 0)
            stop = threading.Event()
            load = threading.Thread(target=lambda: asyncio.run(closed_loop(client.base_url, names, prompts, clients, max_tokens, stop, report.requests)))
            load.start()
            try:
                time.sleep(before_s)
                retries = metric(client, "carve_replica_retries_total")
                (doomed,) = [pid for rid, pid in replica_pids().items() if replicas[rid] == "worker"]
                report.kill_at = time.perf_counter()
                worker.kill(everything=fault == "node")
                wait_for(lambda: not pid_alive(doomed), timeout_s, "the worker's replica process exiting", every_s=0.05)
                report.replica_outlived_s = time.perf_counter() - report.kill_at
                log(f"killed the worker ({fault}); its replica process exited {report.replica_outlived_s:.2f} s later")
                wait_for(lambda: cluster.alive().get(worker.node_id) is False or None, timeout_s, "the worker marked dead")
                follow_recovery(client, report, nodes, timeout_s)
                log(f"two replicas again after {report.recovery_s:.1f} s; job {victim} resumed on the {report.victim_resumed_on}")
                time.sleep(after_s)
            finally:
                stop.set()
                load.join()
            report.resent = metric(client, "carve_replica_retries_total") - retries
            report.cut_streams = sum(1 for r in report.requests if "went away" in r.outcome.error and r.outcome.ttft is not None)
            final = wait_for(lambda: finished(client, victim), timeout_s, "the victim job finishing")
            report.victim_status, report.victim_attempt = final["status"], final.get("attempt", 0)
            for other in job_ids:
                wait_for(lambda: finished(client, other), timeout_s, f"job {other} finishing")
            listed = client.get("/v1/adapters", headers=admin()).json()["data"]
            report.registered_after = sorted(a["name"] for a in listed)
            report.served_after = {tag: complete(client, tag, prompts[0], 4) for tag in [*names, "job-0", "job-1"]}
        return report
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - the cluster goes down next anyway
            pass
        cluster.stop()


def deploy_command(address: str, model: str, registry: Path, database_url: Optional[str], port: int, settings: list[str]) -> list[str]:
    """`carve serve --address ...` onto the cluster on ``port`` (HeadOnly proxy: the nodes share 127.0.0.1)."""
    carve = shutil.which("carve") or str(Path(sys.executable).with_name("carve"))
    database = ["--database", database_url] if database_url else []
    return [
        carve, "serve", "--address", address, "--model", model, "--registry", str(registry), *database,
        "--port", str(port), "--proxy-location", "HeadOnly", *settings,
    ]


def deploy(address: str, model: str, registry: Path, database_url: str, log: Callable[[str], None]) -> int:
    """Deploy the scenario's server (it returns once deployed); the HTTP port."""
    from carve.platform.local_cluster import free_port

    port = free_port()
    command = deploy_command(address, model, registry, database_url, port, [
        "--replicas", "2", "--engine-cpus", "0.5", "--max-adapters", "1", "--max-batch-size", "4", "--job-cpus", "1", "--job-resume-after", "5",
    ])
    env = {**os.environ, "CARVE_ADMIN_TOKEN": ADMIN_TOKEN, "CARVE_HOME": str(registry.parent / "home")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"carve serve --address failed ({done.returncode}): {done.stderr[-2000:]}")
    log(done.stdout.strip().splitlines()[0])
    return port


def follow_recovery(client: Any, report: FaultReport, nodes: dict[str, str], timeout_s: float) -> None:
    """Until Serve runs two engine replicas again (both on the head) and the killed node's job runs again.

    Looking at the job over HTTP is what lets the service notice its dead runner and resume it.
    """
    deadline = time.monotonic() + timeout_s
    while report.recovered_at is None or report.victim_resumed_on is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for recovery: replicas {report.recovered_at is not None}, job {report.victim_resumed_on}")
        if report.recovered_at is None and placed_replicas(nodes, 2, only="head"):
            report.recovered_at = time.perf_counter()
        if report.victim_resumed_on is None:
            view = client.get(f"/v1/specializations/{report.victim_job}").json()
            if view["status"] == "succeeded" or (view["status"] == "running" and view.get("attempt", 0) >= 2 and job_node(report.victim_job, nodes) == "head"):
                report.victim_resumed_on = "head"
        time.sleep(0.5)


def wait_for(probe: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """The first truthy value of ``probe()``; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


# -- what runs where (the GCS actor table: no dashboard needed) ----------------------------------


def live_actors() -> list[dict[str, Any]]:
    from ray._private import state

    return [a for a in state.actors().values() if a.get("State") == "ALIVE"]


def engine_actors() -> dict[str, dict[str, Any]]:
    """Engine replica id (Serve's, as in the metrics) -> its live actor's entry."""
    return {a["Name"].rsplit("#", 1)[-1]: a for a in live_actors() if a.get("ActorClassName", "").endswith(ENGINE_ACTOR)}


def placed_replicas(nodes: dict[str, str], count: int, only: Optional[str] = None) -> Optional[dict[str, str]]:
    """Engine replica id -> node name, once ``count`` replicas are alive (on node ``only`` when given, else on distinct nodes)."""
    replicas = {replica: nodes.get(actor["Address"]["NodeID"], "?") for replica, actor in engine_actors().items()}
    if len(replicas) != count:
        return None
    if only is not None:
        return replicas if set(replicas.values()) == {only} else None
    return replicas if len(set(replicas.values())) == count else None


def replica_pids() -> dict[str, int]:
    """Engine replica id -> its worker process."""
    return {replica: actor["Pid"] for replica, actor in engine_actors().items()}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def job_node(job_id: str, nodes: dict[str, str]) -> Optional[str]:
    """The node whose live actor runs job ``job_id`` (carve.jobs.service.RayLauncher names it), if any."""
    for actor in live_actors():
        if actor.get("Name") == f"carve-job-{job_id}":
            return nodes.get(actor["Address"]["NodeID"])
    return None


def running_jobs(client: Any, job_ids: list[str], nodes: dict[str, str]) -> Optional[dict[str, str]]:
    """Job id -> node once every job runs past its start, on distinct nodes."""
    views = [client.get(f"/v1/specializations/{j}").json() for j in job_ids]
    if any(v["status"] in ("failed", "cancelled", "succeeded") for v in views):
        raise RuntimeError(f"a job ended before the fault: {[(v['id'], v['status'], v.get('error')) for v in views]}")
    placed = {j: job_node(j, nodes) for j in job_ids}
    started = all(v["status"] == "running" and v["progress"] > 0 for v in views)
    return placed if started and len(set(placed.values()) - {None}) == len(job_ids) else None


def finished(client: Any, job_id: str) -> Optional[dict[str, Any]]:
    view = client.get(f"/v1/specializations/{job_id}").json()
    return view if view["status"] in ("succeeded", "failed", "cancelled") else None


# -- HTTP ----------------------------------------------------------------------------------------


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def upload(client: Any, name: str, folder: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    reply = client.post(f"/v1/adapters?name={name}", content=buffer.getvalue(), headers={**admin(), "content-type": "application/gzip"})
    if reply.status_code != 201:
        raise RuntimeError(f"upload of {name}: {reply.status_code} {reply.text[:300]}")


def submit(client: Any, request: dict[str, Any]) -> str:
    reply = client.post("/v1/specializations", json=request)
    if reply.status_code != 202:
        raise RuntimeError(f"job submission: {reply.status_code} {reply.text[:300]}")
    return reply.json()["id"]


def complete(client: Any, model: str, prompt: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    return client.post("/v1/chat/completions", json=body).status_code


def metric(client: Any, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def replica_jobs(client: Any) -> dict[str, float]:
    """Engine replica id -> jobs it finished (carve_replica_jobs_total)."""
    out: dict[str, float] = {}
    for replica, value in re.findall(r'^carve_replica_jobs_total\{[^}]*replica="([^"]+)"[^}]*\} (\S+)$', client.get("/metrics").text, re.M):
        out[replica] = out.get(replica, 0.0) + float(value)
    return out


async def closed_loop(
    base_url: Any, adapters: list[str], prompts: list[str], clients: int, max_tokens: int, stop: threading.Event, out: list[Timed]
) -> None:
    """``clients`` clients, each sending its next request when the previous ends, until ``stop``.

    Client i always asks for adapter ``i % len(adapters)`` (so each replica always holds requests) and streams
    when ``i // len(adapters)`` is odd (so each replica serves plain and streamed requests).
    """
    import httpx

    async def client_loop(index: int, client: Any) -> None:
        turn = 0
        adapter, stream = adapters[index % len(adapters)], (index // len(adapters)) % 2 == 1
        while not stop.is_set():
            request = Request(adapter, prompts[(index + turn) % len(prompts)], max_tokens)
            start = time.perf_counter()
            outcome = await send(client, request, stream=stream)
            out.append(Timed(start, start + outcome.e2e, request.model, outcome))
            turn += 1

    async with httpx.AsyncClient(base_url=str(base_url), timeout=httpx.Timeout(300.0)) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))


# -- the benchmark ------------------------------------------------------------------------------------


def chart(report: FaultReport, path: Path) -> Path:
    """Requests completed (and lost) over time, cumulative, with the kill and the recovery marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r.start for r in report.requests)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, color, done in (("completed", "#4C72B0", True), ("lost", "#C44E52", False)):
        ends = sorted(r.end - t0 for r in report.requests if r.outcome.completed is done)
        if ends:
            ax.step([0.0, *ends], range(len(ends) + 1), where="post", color=color, label=label)
    ax.axvline(report.kill_at - t0, color="black", linestyle="--", label="worker node killed")
    if report.recovered_at is not None:
        ax.axvline(report.recovered_at - t0, color="green", linestyle=":", label="two replicas again (on the head)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests (cumulative)")
    ax.set_title("Carve on two Ray nodes: the worker node lost under load")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary(report: FaultReport, before_s: float, after_s: float) -> str:
    f = report.figures(before_s, after_s)
    return "\n".join([
        f"engine replicas before the fault: {f['replicas_before']}",
        f"adapters first served by: {f['adapter_nodes']}; jobs ran on: {f['job_nodes']}",
        f"requests/s completed: before {f['rps_before']:.2f}, during {f['rps_during']:.2f}, after {f['rps_after']:.2f}",
        f"requests sent {f['sent']}, lost {f['lost']}; in flight at the kill {report.in_flight_by_adapter()}, on the killed node "
        f"{f['in_flight_at_kill']}; its replica process exited {f['replica_outlived_s']:.2f} s after the kill; engine calls sent again "
        f"{f['resent']:.0f}, streams cut {f['cut_streams']}; longest gap without a completion {f['longest_gap_s']:.1f} s",
        f"recovery {f['recovery_s']:.1f} s; job {report.victim_job}: {report.victim_status} after {f['victim_attempt']} attempts, "
        f"resumed on the {report.victim_resumed_on}",
        f"registered after the fault: {f['registered_after']}; served after: {f['served_after']}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--before-s", type=float, default=15.0)
    parser.add_argument("--after-s", type=float, default=15.0)
    parser.add_argument("--fault", choices=("raylet", "node"), default="raylet", help="SIGKILL the worker's raylet, or every process of the node at once.")
    args = parser.parse_args()

    import pgserver

    from carve.engine.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="carve-cluster-"))
    pg_folder = Path(tempfile.mkdtemp(prefix="carve-pg-"))  # its own folder under /tmp: pgserver runs the server as another user
    server = pgserver.get_server(pg_folder / "pgdata", cleanup_mode="delete")
    try:
        model_dir = resolve_model(args.model).path
        adapters = make_random_adapters(Path(model_dir), ["alpha", "beta"], work / "adapters")
        seeds = [json.loads(line) for line in (ROOT / "seeds" / "biomedical" / "seeds.jsonl").read_text().splitlines()]
        few = [s for s in seeds if len(s["input"].split()) <= 60][:12]
        job = {
            "seeds": "".join(json.dumps(s) + "\n" for s in few), "domain": {"name": "biomedical"},
            "corpus": {"path": str(ROOT / "data" / "corpus" / "pubmed_sample.jsonl")},
            "settings": {"instances": "corpus", "corpus_per_task": 2, "response_max_new_tokens": 24, "training": {"epochs": 1}},
        }
        prompts = [" ".join(s["input"].split()[:40]) for s in few]
        report = run_fault_scenario(
            args.model, adapters, server.get_uri(), work, job, prompts, clients=args.clients, max_tokens=args.max_tokens,
            before_s=args.before_s, after_s=args.after_s, fault=args.fault,
        )
    finally:
        server.cleanup()
        shutil.rmtree(pg_folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(summary(report, args.before_s, args.after_s))
    print(f"chart: {chart(report, OUT_DIR / f'cluster_faults-{args.fault}.png')}")
    figures = {"fault": args.fault, "model": args.model, "clients": args.clients, "max_tokens": args.max_tokens, **report.figures(args.before_s, args.after_s)}
    (OUT_DIR / f"cluster_faults-{args.fault}.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"RESULT lost={report.lost} in_flight_at_kill={report.in_flight_at_kill} recovery_s={report.recovery_s:.1f} job_resumed={int(report.job_resumed)}")


if __name__ == "__main__":
    main()
