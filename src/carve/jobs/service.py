"""Accepting, running, following and cancelling specialization jobs.

:class:`JobService` validates a submission completely (tag, domain, every seed
line, corpus, settings, base model) before a job exists, stores its seed set
and corpus in ``<registry>/jobs/<id>/``, records it, and hands it to a
launcher: :class:`RayLauncher` runs it in a detached Ray actor in the cluster
(never inside an HTTP replica, and not owned by one: a replica's death does
not stop it), :class:`InlineLauncher` in the calling thread (``carve submit``
without a server). On start and on every look at the jobs, the service
resumes the active jobs whose runner stopped beating (a dead node, a killed
worker) until they run out of attempts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from pydantic import ValidationError

from carve.common.database import database_url
from carve.common.errors import error_field, error_lines
from carve.jobs.api import SpecializationRequest
from carve.jobs.runner import execute_job
from carve.jobs.settings import JobSettings
from carve.jobs.store import ACTIVE, JobRecord, JobStore, new_job_id

FORBIDDEN_SETTINGS = ("base", "profile")  # the server's model, and the request's own field


class JobRejected(ValueError):
    """A submission refused before any job exists; ``problems`` lists every fault, ``param`` the field."""

    def __init__(self, problems: list[str], param: str, status: int = 422):
        self.problems, self.param, self.status = list(problems), param, status
        count = len(self.problems)
        super().__init__(f"submission refused ({count} problem{'s' if count != 1 else ''}): " + "; ".join(self.problems[:10]))


class Launcher(Protocol):
    background: bool  # jobs run elsewhere (a stalled one may be relaunched while the service serves requests)

    def launch(self, root: Path, job_id: str, settings: JobSettings, database: str) -> None:
        """Start (or resume) job ``job_id`` of the registry at ``root``, recorded in ``database`` (a URL)."""

    def cancel(self, job_id: str) -> None: ...

    def crashed(self) -> dict[str, str]:
        """Jobs whose launch ended in an error outside the job (its worker died), with the error."""


class RayLauncher:
    """One detached, named Ray actor per job (``num_cpus`` reserved, never restarted by Ray: resumption is the service's).

    The name ``carve-job-<id>`` in namespace ``carve-jobs`` makes a launch
    idempotent: a job whose actor is still alive (launched by a replica that
    has since died) is left to it instead of being started twice.
    """

    NAMESPACE = "carve-jobs"
    background = True

    def __init__(self) -> None:
        self.refs: dict[str, Any] = {}

    @staticmethod
    def actor_name(job_id: str) -> str:
        return f"carve-job-{job_id}"

    def _live_actor(self, job_id: str) -> Any:
        import ray

        try:
            return ray.get_actor(self.actor_name(job_id), namespace=self.NAMESPACE)
        except ValueError:  # no such (live) actor
            return None

    def launch(self, root: Path, job_id: str, settings: JobSettings, database: str) -> None:
        import ray

        from carve.jobs.runner import JobActor

        if self._live_actor(job_id) is not None:
            return
        actor = (
            ray.remote(JobActor)
            .options(
                name=self.actor_name(job_id), namespace=self.NAMESPACE, lifetime="detached",
                num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_restarts=0,
            )
            .remote()
        )
        self.refs[job_id] = actor.run.remote(str(root), job_id, settings.heartbeat_s, settings.stale_after_s, database)

    def cancel(self, job_id: str) -> None:
        import ray

        self.refs.pop(job_id, None)
        actor = self._live_actor(job_id)
        if actor is not None:
            ray.kill(actor, no_restart=True)  # kills the worker process: the job stops now, not at its next report

    def crashed(self) -> dict[str, str]:
        import ray

        if not self.refs:
            return {}
        ready, _ = ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=0)
        out: dict[str, str] = {}
        for job_id, ref in list(self.refs.items()):
            if ref not in ready:
                continue
            del self.refs[job_id]
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - whatever killed the worker is the job's error
                out[job_id] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return out


class InlineLauncher:
    """Runs the job in the calling thread, to its end (local mode)."""

    background = False

    def launch(self, root: Path, job_id: str, settings: JobSettings, database: str) -> None:
        execute_job(root, job_id, settings.heartbeat_s, settings.stale_after_s, database)

    def cancel(self, job_id: str) -> None:  # the store's status stops the runner at its next report
        return None

    def crashed(self) -> dict[str, str]:
        return {}


class JobService:
    """Specialization jobs of one registry, for one base model.

    ``database`` as for JobStore; it is resolved once here and handed to every
    launch, so a job's runner (on any node) writes to the same database.
    """

    def __init__(
        self, root: Path, base: str, launcher: Launcher, settings: JobSettings | None = None, recover: bool = True,
        database: Optional[str] = None,
    ):
        self.root = Path(root).expanduser()
        self.base = str(base)
        self.launcher = launcher
        self.settings = settings or JobSettings()
        self.database = database_url(database, self.root)
        self.store = JobStore(self.root, self.database)
        if recover:
            self.recover()

    # -- submitting ---------------------------------------------------------------

    def submit(self, request: SpecializationRequest | dict[str, Any]) -> JobRecord:
        """Validate everything, store the inputs, record the job and launch it; JobRejected changes nothing."""
        if not isinstance(request, SpecializationRequest):
            request = parse_request(request)
        job_id = new_job_id()
        staging = self.store.jobs_dir / f".incoming-{job_id}"
        staging.mkdir(parents=True)
        try:
            settings, corpus, evaluation = self._validate(request, staging)
            folder = self.store.jobs_dir / job_id
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        corpus_path = (folder / corpus.relative_to(staging)) if corpus is not None and corpus.is_relative_to(staging) else corpus
        stored = {"profile": request.profile, "settings": settings, "domain": request.domain.model_dump()}
        if evaluation is not None:
            tasks = Path(evaluation["tasks"])
            stored["evaluation"] = {**evaluation, "tasks": str(folder / tasks.relative_to(staging) if tasks.is_relative_to(staging) else tasks)}
        job = self.store.create(job_id, request.tag, stored, self.base, folder, corpus_path)
        self.launcher.launch(self.root, job_id, self.settings, self.database)
        return self.store.get(job.id)

    def _validate(self, request: SpecializationRequest, staging: Path) -> tuple[dict[str, Any], Optional[Path], Optional[dict[str, Any]]]:
        """Every check of a submission, writing only into ``staging``; returns (settings, corpus path, evaluation)."""
        from carve.adapters.registry import RegistryError, check_label
        from carve.engine.models import ModelError
        from carve.specialize.config import build_config
        from carve.specialize.retrieval import CorpusError
        from carve.specialize.run import RunError, prepare
        from carve.specialize.seeds import SeedSetError, parse_domain, parse_seed_lines, write_seed_set

        problems: list[str] = []
        try:
            check_label(request.tag, "domain tag")
        except RegistryError as exc:
            raise JobRejected([str(exc)], "tag") from None
        description = request.domain.description or f"Seeds submitted for the {request.tag} domain."
        try:
            domain = parse_domain({"name": request.domain.name or request.tag, "tag": request.tag, "description": description}, "domain")
        except SeedSetError as exc:
            problems += exc.problems
        try:
            seeds = parse_seed_lines(request.seeds, "seeds")
        except SeedSetError as exc:
            raise JobRejected(problems + exc.problems, "seeds") from None
        if problems:
            raise JobRejected(problems, "domain")
        bad = [k for k in request.settings if k in FORBIDDEN_SETTINGS]
        if bad:
            raise JobRejected([f"settings.{k}: set by the server (base) or the request's own field (profile)" for k in bad], "settings")
        try:
            config = build_config(request.profile, base=self.base, **request.settings)
        except (ValidationError, TypeError) as exc:
            details = error_lines(exc, prefix=("settings",)) if isinstance(exc, ValidationError) else [f"settings: {exc}"]
            raise JobRejected(details, "settings") from None
        corpus: Optional[Path] = None
        if request.corpus is not None:
            if request.corpus.jsonl is not None:
                corpus = staging / "corpus.jsonl"
                corpus.write_text(request.corpus.jsonl, encoding="utf-8")
            else:
                corpus = Path(str(request.corpus.path)).expanduser().resolve()
        write_seed_set(staging / "seeds", domain, seeds)
        evaluation = self._evaluation(request, staging, seeds)
        try:  # the pipeline's own checks: corpus lines, retrieval without a corpus, the base model
            prepare(config, staging / "seeds", corpus, staging / "run", resume=True)
        except (CorpusError, SeedSetError) as exc:
            raise JobRejected(list(exc.problems), "corpus" if isinstance(exc, CorpusError) else "seeds") from None
        except RunError as exc:
            raise JobRejected([str(exc)], "corpus") from None
        except ModelError as exc:
            raise JobRejected([f"base model: {exc}"], "model", status=500) from None
        return {k: v for k, v in request.settings.items()}, corpus, evaluation

    @staticmethod
    def _evaluation(request: SpecializationRequest, staging: Path, seeds: list[Any]) -> Optional[dict[str, Any]]:
        """The evaluation tasks, checked line by line (staged when sent inline); None when the request has none."""
        from carve.evaluation.suite import SuiteError, load_suite

        spec = request.evaluation
        if spec is None:
            return None
        if spec.jsonl is not None:
            tasks = staging / "eval_tasks.jsonl"
            tasks.write_text(spec.jsonl, encoding="utf-8")
        else:
            tasks = Path(str(spec.path)).expanduser().resolve()
        try:
            load_suite(tasks)
        except SuiteError as exc:  # an inline text is named as the request's field, not by its staging path
            message = str(exc).replace(str(tasks), "evaluation.jsonl") if spec.jsonl is not None else str(exc)
            raise JobRejected([message], "evaluation") from None
        if max(spec.shots) > len(seeds):
            raise JobRejected([f"evaluation.shots: k={max(spec.shots)} needs that many seeds, the job has {len(seeds)}"], "evaluation")
        return {"tasks": str(tasks), "shots": spec.shots, "limit": spec.limit}

    # -- following and cancelling -------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        self.refresh()
        return self.store.get(job_id)

    def list(self, status: Optional[str] = None, limit: int = 100) -> list[JobRecord]:
        self.refresh()
        return self.store.list(status, limit)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel an active job (JobConflict when finished, JobNotFound when unknown)."""
        job = self.store.cancel(job_id)
        self.launcher.cancel(job_id)
        return job

    def refresh(self) -> None:
        """Resume the jobs whose runner is gone (a lost node, a killed worker), failing those out of attempts.

        A runner whose worker died (its launch ended in an error outside the job)
        is resumed like one that stopped beating: once its last heartbeat is
        ``stale_after_s`` old, so that no live runner can still hold the job.
        """
        crashed = self.launcher.crashed()
        for job_id, error in crashed.items():
            job = self.store.get(job_id)
            if job.status in ACTIVE and job.attempt >= self.settings.max_attempts:
                self.store.fail(job_id, None, f"the job's worker died ({error}) on attempt {job.attempt} of {self.settings.max_attempts}")
        if self.launcher.background:
            self.recover()

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 0.5) -> JobRecord:
        """Poll until the job finishes or ``timeout_s`` passes; returns its last state."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.status not in ACTIVE or time.monotonic() >= deadline:
                return job
            time.sleep(poll_s)

    # -- after a restart ------------------------------------------------------------

    def recover(self) -> list[str]:
        """Relaunch (with resume) the active jobs whose runner is gone; fail those out of attempts. Returns relaunched ids."""
        relaunched = []
        for job in self.store.orphaned(self.settings.stale_after_s):
            if job.attempt >= self.settings.max_attempts:
                self.store.fail(job.id, None, f"gave up after {job.attempt} attempts; the last runner stopped at stage {job.stage!r} without finishing")
                continue
            self.launcher.launch(self.root, job.id, self.settings, self.database)
            relaunched.append(job.id)
        return relaunched


def parse_request(data: Any) -> SpecializationRequest:
    """A submission from decoded JSON; JobRejected naming each bad field."""
    if not isinstance(data, dict):
        raise JobRejected([f"the body must be a JSON object, got {type(data).__name__}"], "body")
    try:
        return SpecializationRequest.model_validate(data)
    except ValidationError as exc:
        raise JobRejected(error_lines(exc), error_field(exc.errors()[0], empty="body")) from None


def parse_request_bytes(raw: bytes) -> SpecializationRequest:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JobRejected([f"malformed JSON body: {exc}"], "body") from None
    return parse_request(data)
