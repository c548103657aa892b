"""Specialization jobs, recorded in the Carve database (its own ``jobs`` table, beside the registry's).

Job state lives in the database, not in a server's memory, so a job survives
the server that accepted it: a restarted server finds jobs left ``running``
(their runner's heartbeat went stale) and resumes them.

A runner *claims* a job before working on it (a token and a heartbeat, set in
one write transaction), and every later write of that runner is conditional on
still holding the claim while the job is ``running``. So a cancelled job is
never overwritten by its dying runner, and two runners (a resumed one and a
slow original) never both work on one job.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, Optional

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection, Row
from sqlalchemy.schema import CreateIndex, CreateTable

from carve.common.database import Database, Migration, database_url

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[str, ...] = ("queued", "running")
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")

COMPONENT = "jobs"

# The table as this Carve uses it; migration 1 creates it (see the note in carve.adapters.registry).
metadata = sa.MetaData()
jobs = sa.Table(  # one row per job
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tag", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("stage", sa.Text, nullable=False),
    sa.Column("progress", sa.Float, nullable=False, server_default=sa.text("0")),
    sa.Column("detail", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("request", sa.Text, nullable=False),  # the validated submission (profile, settings, domain) as JSON
    sa.Column("base", sa.Text, nullable=False),
    sa.Column("folder", sa.Text, nullable=False),
    sa.Column("corpus", sa.Text),
    sa.Column("adapter_name", sa.Text),
    sa.Column("adapter_version", sa.Integer),
    sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("runner", sa.Text),
    sa.Column("heartbeat_at", sa.Text),  # ISO 8601, UTC, like every time below
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Text, nullable=False),
    sa.Column("finished_at", sa.Text),
)
jobs_by_status = sa.Index("jobs_by_status", jobs.c.status, jobs.c.created_at)

MIGRATIONS: list[Migration] = [
    [CreateTable(jobs), CreateIndex(jobs_by_status)],  # 1: the jobs table
]


class JobNotFound(LookupError):
    """No job with this id; the message says so."""


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the operation (e.g. cancelling a finished job)."""


class JobRecord(BaseModel):
    """One job as stored."""

    id: str
    tag: str
    status: Status
    stage: str
    progress: float
    detail: Optional[str] = None
    error: Optional[str] = None
    request: dict[str, Any]
    base: str
    folder: Path
    corpus: Optional[Path] = None
    adapter_name: Optional[str] = None
    adapter_version: Optional[int] = None
    attempt: int = 0
    runner: Optional[str] = None
    heartbeat_at: Optional[datetime] = None
    created_at: datetime
    updated_at: datetime
    finished_at: Optional[datetime] = None

    @property
    def seeds_dir(self) -> Path:
        return self.folder / "seeds"

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:16]


class JobStore:
    """The ``jobs`` table of the Carve database of the registry at ``root`` (``database``: see carve.common.database)."""

    def __init__(self, root: Path, database: Optional[str] = None):
        self.root = Path(root).expanduser()
        self.database = Database(database_url(database, self.root))
        self.jobs_dir = self.root / "jobs"
        self.database.migrate(COMPONENT, MIGRATIONS)

    # -- creating and reading --------------------------------------------------

    def create(self, job_id: str, tag: str, request: dict[str, Any], base: str, folder: Path, corpus: Path | None) -> JobRecord:
        stamp = now().isoformat()
        with self.database.write(COMPONENT) as conn:
            conn.execute(
                jobs.insert().values(
                    id=job_id, tag=tag, status="queued", stage="queued", progress=0, request=json.dumps(request, sort_keys=True),
                    base=base, folder=str(folder), corpus=str(corpus) if corpus else None, created_at=stamp, updated_at=stamp,
                )
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with self.database.read() as conn:
            return _get(conn, job_id)

    def list(self, status: Optional[str] = None, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        if status:
            query = query.where(jobs.c.status == status)
        with self.database.read() as conn:
            return [_record(r) for r in conn.execute(query).all()]

    def orphaned(self, stale_after_s: float) -> list[JobRecord]:
        """Active jobs whose runner shows no sign of life for ``stale_after_s`` (or never started), oldest first."""
        cutoff = now() - timedelta(seconds=stale_after_s)
        active = [j for j in self.list(limit=10_000) if j.status in ACTIVE]
        return sorted((j for j in active if (j.heartbeat_at or j.updated_at) < cutoff), key=lambda j: j.created_at)

    # -- the runner's writes (conditional on its claim) --------------------------

    def claim(self, job_id: str, token: str, stale_after_s: float) -> Optional[JobRecord]:
        """Take the job for runner ``token``; None when it is finished or another runner is alive on it."""
        stamp = now()
        with self.database.write(COMPONENT) as conn:
            job = _get(conn, job_id)
            if job.status not in ACTIVE:
                return None
            alive = job.runner not in (None, token) and job.heartbeat_at is not None and (stamp - job.heartbeat_at).total_seconds() < stale_after_s
            if alive:
                return None
            conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id).values(
                    status="running", runner=token, attempt=jobs.c.attempt + 1, heartbeat_at=stamp.isoformat(),
                    updated_at=stamp.isoformat(), stage="starting", detail="resuming from the run folder" if job.attempt > 0 else None,
                )
            )
            return _get(conn, job_id)

    def _update_claimed(self, job_id: str, token: str, **values: Any) -> bool:
        """Write ``values`` (and a heartbeat) only while runner ``token`` holds the running job."""
        stamp = now().isoformat()
        with self.database.write(COMPONENT) as conn:
            held = sa.update(jobs).where(jobs.c.id == job_id, jobs.c.runner == token, jobs.c.status == "running")
            return conn.execute(held.values(**values, heartbeat_at=stamp, updated_at=stamp)).rowcount == 1

    def heartbeat(self, job_id: str, token: str) -> bool:
        """False when the runner lost the job (cancelled, or taken over after its heartbeat went stale)."""
        with self.database.write(COMPONENT) as conn:
            held = sa.update(jobs).where(jobs.c.id == job_id, jobs.c.runner == token, jobs.c.status == "running")
            return conn.execute(held.values(heartbeat_at=now().isoformat())).rowcount == 1

    def report(self, job_id: str, token: str, stage: str, progress: float, detail: Optional[str]) -> bool:
        return self._update_claimed(job_id, token, stage=stage, progress=round(progress, 4), detail=detail)

    def succeed(self, job_id: str, token: str, adapter_name: str, adapter_version: int) -> bool:
        return self._update_claimed(
            job_id, token, status="succeeded", stage="done", progress=1, detail=None,
            adapter_name=adapter_name, adapter_version=adapter_version, finished_at=now().isoformat(),
        )

    def fail(self, job_id: str, token: Optional[str], error: str) -> bool:
        """Mark failed; with ``token`` None, whoever holds it (the service recording a dead worker or a give-up)."""
        stamp = now().isoformat()
        query = sa.update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE))
        if token is not None:
            query = query.where(jobs.c.runner == token)
        with self.database.write(COMPONENT) as conn:
            return conn.execute(query.values(status="failed", error=error, finished_at=stamp, updated_at=stamp)).rowcount == 1

    def cancel(self, job_id: str) -> JobRecord:
        """Mark an active job cancelled (its runner stops at its next report); JobConflict when it already finished."""
        stamp = now().isoformat()
        with self.database.write(COMPONENT) as conn:
            job = _get(conn, job_id)
            if job.status in FINISHED:
                raise JobConflict(f"job {job_id} already {job.status}: nothing to cancel")
            conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id).values(
                    status="cancelled", detail="cancelled on request", finished_at=stamp, updated_at=stamp
                )
            )
        return self.get(job_id)


def _get(conn: Connection, job_id: str) -> JobRecord:
    row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    if row is None:
        raise JobNotFound(f"no specialization job {job_id!r}")
    return _record(row)


def _record(row: Row[Any]) -> JobRecord:
    data = dict(row._mapping)
    data["request"] = json.loads(data["request"])
    return JobRecord.model_validate(data)
