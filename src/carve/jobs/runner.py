"""Running one specialization job: claim it, run the pipeline (resuming), register the adapter, report.

:func:`execute_job` is what a Ray task (or a local process) runs. It reports
the pipeline's stages (carve.common.progress) into the job store, keeps a heartbeat,
and stops at its next report once the job is cancelled or taken over. The
pipeline always runs with resume semantics: a job restarted after its server
died continues from the files its run folder already holds.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Optional

from carve.common.database import database_url
from carve.jobs.settings import HEARTBEAT_S, STALE_AFTER_S
from carve.jobs.store import JobRecord, JobStore

REPORT_EVERY_S = 0.5
# Share of the whole run each stage takes, matched by name prefix: the SmolLM2 quick profile's
# stage times on an idle machine (seed training 438 s, instructions 462, responses 252, training 77).
STAGE_SHARES = (
    ("load", 0.03), ("seed training", 0.30), ("instructions", 0.35), ("retrieval", 0.01), ("responses", 0.20), ("training", 0.09),
    ("eval", 0.15), ("register", 0.02),
)
ONCE_PER_JOB = ("load", "seed training", "eval", "register")  # the others repeat in every iteration


class JobCancelled(Exception):
    """The job was cancelled (or another runner took it over): stop without writing."""


def stage_progress(stage: str, fraction: float, iteration: int, iterations: int, seed_stage: bool = False, evaluating: bool = False) -> float:
    """Progress over the whole job of ``fraction`` of ``stage`` in ``iteration`` (1-based) of ``iterations``.

    ``seed_stage``: the run trains on the seeds first (stage 0); ``evaluating``: it ends with an
    evaluation; without them their shares are left out.
    """
    shares = [(name, share) for name, share in STAGE_SHARES if (seed_stage or name != "seed training") and (evaluating or name != "eval")]
    scale = sum(share for _, share in shares)
    names = [name for name, _ in shares]
    key = next((name for name in names if stage.startswith(name)), None)
    if key is None:
        return 0.0
    start = sum(share for _, share in shares[: names.index(key)]) / scale
    share = dict(shares)[key] / scale
    done = share * min(max(fraction, 0.0), 1.0)
    if key in ONCE_PER_JOB:
        return start + done
    first_repeating = next(i for i, name in enumerate(names) if name not in ONCE_PER_JOB)
    body_start = sum(share for _, share in shares[:first_repeating]) / scale
    body = sum(share for name, share in shares if name not in ONCE_PER_JOB) / scale
    within = (start - body_start + done) / body
    return body_start + body * ((iteration - 1) + within) / iterations


class Reporter:
    """Turns carve.common.progress events of this thread into job store updates, and raises JobCancelled when the job is lost."""

    def __init__(self, store: JobStore, job_id: str, token: str, iterations: int):
        self.store, self.job_id, self.token, self.iterations = store, job_id, token, iterations
        self.seed_stage = self.evaluating = False  # set once the job's settings are known
        self.thread = threading.get_ident()
        self.iteration = 1
        self.lost = threading.Event()
        self._last = 0.0

    def set_stage(self, stage: str, fraction: float = 0.0, detail: Optional[str] = None) -> None:
        progress = stage_progress(stage, fraction, self.iteration, self.iterations, self.seed_stage, self.evaluating)
        if not self.store.report(self.job_id, self.token, stage, progress, detail):
            self.lost.set()
        self.check()

    def check(self) -> None:
        if self.lost.is_set():
            raise JobCancelled(self.job_id)

    def __call__(self, progress: Any, event: str) -> None:
        if threading.get_ident() != self.thread:
            return  # another job's stage in this process
        if "(iteration 2)" in progress.stage:
            self.iteration = 2
        now = time.monotonic()
        if event == "advance" and now - self._last < REPORT_EVERY_S:
            self.check()
            return
        self._last = now
        fraction = progress.done / progress.total if progress.total else 0.0
        total = f"/{progress.total}" if progress.total else ""
        self.set_stage(progress.stage, fraction, f"{progress.done}{total} {progress.unit}")


class Heartbeat:
    """Marks the job alive every ``every_s`` from a thread; notices when the job was cancelled or taken over."""

    def __init__(self, reporter: Reporter, every_s: float):
        self.reporter, self.every_s = reporter, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{reporter.job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            r = self.reporter
            try:
                if not r.store.heartbeat(r.job_id, r.token):
                    r.lost.set()
                    return
            except Exception:  # a busy database: try again next beat
                continue


def execute_job(
    root: Path, job_id: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S, database: Optional[str] = None
) -> str:
    """Run job ``job_id`` of the registry at ``root`` (recorded in ``database``, see JobStore) to its end; returns its final status.

    Never raises for a failure of the job itself: that is recorded in the store.
    """
    database = database_url(database, root)  # one database for the job's record and its adapter
    store = JobStore(root, database)
    token = uuid.uuid4().hex
    job = store.claim(job_id, token, stale_after_s)
    if job is None:
        return store.get(job_id).status  # finished, cancelled, or another live runner has it
    from carve.common.progress import listening

    reporter = Reporter(store, job_id, token, int(job.request.get("settings", {}).get("iterations") or 1))
    try:
        with Heartbeat(reporter, heartbeat_s), listening(reporter):
            record = _run(job, reporter, Path(root), database)
        if not store.succeed(job_id, token, record.name, record.version):
            _unregister(root, database, record)  # cancelled while registering: leave nothing behind
            return store.get(job_id).status
        return "succeeded"
    except JobCancelled:
        return store.get(job_id).status
    except BaseException as exc:  # noqa: BLE001 - every failure is the job's, recorded for its owner
        stage = store.get(job_id).stage
        message = f"{stage}: {type(exc).__name__}: {exc}"
        if not isinstance(exc, (ValueError, LookupError)):  # not a plain input problem: keep where it came from
            message += "\n" + "".join(traceback.format_exception(exc)[-3:])
        store.fail(job_id, token, message.strip())
        if not isinstance(exc, Exception):
            raise
        return "failed"


def _run(job: JobRecord, reporter: Reporter, root: Path, database: str) -> Any:
    """The pipeline (resuming from the run folder), then registration under the job's tag."""
    from carve.adapters.registry import Registry
    from carve.specialize.config import build_config
    from carve.specialize.run import ADAPTER, prepare, run_specialization, runs_seed_stage

    reporter.set_stage("load model")
    request = job.request
    config = build_config(request["profile"], base=job.base, **request.get("settings", {}))
    evaluation = request.get("evaluation")
    tasks = Path(evaluation["tasks"]) if evaluation else None
    reporter.seed_stage, reporter.evaluating = runs_seed_stage(config, tasks is not None), tasks is not None
    inputs = prepare(config, job.seeds_dir, job.corpus, job.run_dir, resume=True, eval_tasks=tasks)
    run_specialization(inputs, tasks, {"shots": evaluation["shots"], "limit": evaluation["limit"]} if evaluation else None)
    reporter.set_stage("register")
    registry = Registry(root, database)
    return registry.add(job.run_dir / ADAPTER, job.tag, tags=[job.tag], base=inputs.base)


def _unregister(root: Path, database: str, record: Any) -> None:
    from carve.adapters.registry import Registry, RegistryError

    try:
        Registry(root, database).remove(record.name, record.version)
    except RegistryError:
        pass


class JobActor:
    """One job in a detached Ray actor: it outlives the HTTP replica that launched it.

    A plain task is owned by its caller and dies with it, so a gateway replica
    restarted by Serve would take every running job down with it. The actor
    runs the job once, then removes itself a few seconds after returning, long
    enough for a live launcher to collect the result and soon enough that no
    idle actor keeps its reserved CPUs when the launcher is gone.
    """

    EXIT_AFTER_S = 3.0

    def run(self, root: str, job_id: str, heartbeat_s: float, stale_after_s: float, database: str) -> str:
        try:
            return execute_job(Path(root), job_id, heartbeat_s, stale_after_s, database)
        finally:
            threading.Timer(self.EXIT_AFTER_S, _kill_current_actor).start()


def _kill_current_actor() -> None:
    import ray

    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
