"""Specialization jobs, recorded in the registry's SQLite file (its own ``jobs`` table).

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
import sqlite3
import uuid
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel

from carve.adapters.registry import DB_FILE
from carve.adapters.sqlite import connect, immediate, migrate

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[str, ...] = ("queued", "running")
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")

MIGRATIONS: list[list[str]] = [
    [  # 1: one row per job; request holds the validated submission (profile, settings, domain) as JSON
        "CREATE TABLE jobs ("
        " id TEXT PRIMARY KEY, tag TEXT NOT NULL, status TEXT NOT NULL, stage TEXT NOT NULL,"
        " progress REAL NOT NULL DEFAULT 0, detail TEXT, error TEXT,"
        " request TEXT NOT NULL, base TEXT NOT NULL, folder TEXT NOT NULL, corpus TEXT,"
        " adapter_name TEXT, adapter_version INTEGER,"
        " attempt INTEGER NOT NULL DEFAULT 0, runner TEXT, heartbeat_at TEXT,"
        " created_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT)",
        "CREATE INDEX jobs_by_status ON jobs (status, created_at)",
    ],
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
    """The ``jobs`` table of the registry database at ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()
        self.db_path = self.root / DB_FILE
        self.jobs_dir = self.root / "jobs"
        with closing(connect(self.db_path)) as conn:
            migrate(conn, "jobs", MIGRATIONS)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.db_path)

    # -- creating and reading --------------------------------------------------

    def create(self, job_id: str, tag: str, request: dict[str, Any], base: str, folder: Path, corpus: Path | None) -> JobRecord:
        stamp = now().isoformat()
        with closing(self._connect()) as conn, immediate(conn):
            conn.execute(
                "INSERT INTO jobs (id, tag, status, stage, progress, request, base, folder, corpus, created_at, updated_at)"
                " VALUES (?, ?, 'queued', 'queued', 0, ?, ?, ?, ?, ?, ?)",
                (job_id, tag, json.dumps(request, sort_keys=True), base, str(folder), str(corpus) if corpus else None, stamp, stamp),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no specialization job {job_id!r}")
        return _record(row)

    def list(self, status: Optional[str] = None, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        sql = "SELECT * FROM jobs" + (" WHERE status = ?" if status else "") + " ORDER BY created_at DESC LIMIT ?"
        with closing(self._connect()) as conn:
            rows = conn.execute(sql, (status, limit) if status else (limit,)).fetchall()
        return [_record(r) for r in rows]

    def orphaned(self, stale_after_s: float) -> list[JobRecord]:
        """Active jobs whose runner shows no sign of life for ``stale_after_s`` (or never started), oldest first."""
        cutoff = now() - timedelta(seconds=stale_after_s)
        jobs = [j for j in self.list(limit=10_000) if j.status in ACTIVE]
        return sorted((j for j in jobs if (j.heartbeat_at or j.updated_at) < cutoff), key=lambda j: j.created_at)

    # -- the runner's writes (conditional on its claim) --------------------------

    def claim(self, job_id: str, token: str, stale_after_s: float) -> Optional[JobRecord]:
        """Take the job for runner ``token``; None when it is finished or another runner is alive on it."""
        stamp = now()
        with closing(self._connect()) as conn:
            with immediate(conn):
                row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise JobNotFound(f"no specialization job {job_id!r}")
                job = _record(row)
                if job.status not in ACTIVE:
                    return None
                alive = job.runner not in (None, token) and job.heartbeat_at is not None and (stamp - job.heartbeat_at).total_seconds() < stale_after_s
                if alive:
                    return None
                resumed = job.attempt > 0
                conn.execute(
                    "UPDATE jobs SET status = 'running', runner = ?, attempt = attempt + 1, heartbeat_at = ?, updated_at = ?,"
                    " stage = ?, detail = ? WHERE id = ?",
                    (token, stamp.isoformat(), stamp.isoformat(), "starting", "resuming from the run folder" if resumed else None, job_id),
                )
            return _record(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def _update_claimed(self, job_id: str, token: str, sets: str, params: tuple[Any, ...]) -> bool:
        stamp = now().isoformat()
        with closing(self._connect()) as conn, immediate(conn):
            cursor = conn.execute(
                f"UPDATE jobs SET {sets}, heartbeat_at = ?, updated_at = ? WHERE id = ? AND runner = ? AND status = 'running'",
                (*params, stamp, stamp, job_id, token),
            )
            return cursor.rowcount == 1

    def heartbeat(self, job_id: str, token: str) -> bool:
        """False when the runner lost the job (cancelled, or taken over after its heartbeat went stale)."""
        with closing(self._connect()) as conn, immediate(conn):
            cursor = conn.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND runner = ? AND status = 'running'", (now().isoformat(), job_id, token)
            )
            return cursor.rowcount == 1

    def report(self, job_id: str, token: str, stage: str, progress: float, detail: Optional[str]) -> bool:
        return self._update_claimed(job_id, token, "stage = ?, progress = ?, detail = ?", (stage, round(progress, 4), detail))

    def succeed(self, job_id: str, token: str, adapter_name: str, adapter_version: int) -> bool:
        return self._update_claimed(
            job_id, token, "status = 'succeeded', stage = 'done', progress = 1, detail = NULL, adapter_name = ?, adapter_version = ?, finished_at = ?",
            (adapter_name, adapter_version, now().isoformat()),
        )

    def fail(self, job_id: str, token: Optional[str], error: str) -> bool:
        """Mark failed; with ``token`` None, whoever holds it (the service recording a dead worker or a give-up)."""
        stamp = now().isoformat()
        with closing(self._connect()) as conn, immediate(conn):
            cursor = conn.execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, updated_at = ? WHERE id = ? AND status IN ('queued', 'running')"
                + (" AND runner = ?" if token is not None else ""),
                (error, stamp, stamp, job_id, *((token,) if token is not None else ())),
            )
            return cursor.rowcount == 1

    def cancel(self, job_id: str) -> JobRecord:
        """Mark an active job cancelled (its runner stops at its next report); JobConflict when it already finished."""
        stamp = now().isoformat()
        with closing(self._connect()) as conn, immediate(conn):
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no specialization job {job_id!r}")
            if row["status"] in FINISHED:
                raise JobConflict(f"job {job_id} already {row['status']}: nothing to cancel")
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', detail = 'cancelled on request', finished_at = ?, updated_at = ? WHERE id = ?",
                (stamp, stamp, job_id),
            )
        return self.get(job_id)


def _record(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    data["request"] = json.loads(data["request"])
    return JobRecord.model_validate(data)
