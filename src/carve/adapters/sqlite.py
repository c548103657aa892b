"""SQLite plumbing shared by everything Carve keeps in one database file.

Several processes (the CLI, a server, a specialization job) may write at once,
so every connection uses WAL (readers never block the writer), a busy timeout
(writers queue instead of failing), and writes run inside ``BEGIN IMMEDIATE``
(the write lock is taken up front, so a read-then-write such as "allocate the
next version" cannot interleave with another writer's).

Schema changes are numbered per component in ``schema_migrations``, so the
registry and other components (jobs, ...) can each evolve their own tables in
the same file, and a database written by a newer Carve is refused rather than
misread.
"""

from __future__ import annotations

import random
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

BUSY_TIMEOUT_S = 60.0

Migration = Sequence[str]  # the SQL statements of one schema version, applied in one transaction


class SchemaError(RuntimeError):
    """The database's schema is not one this Carve can use."""


def connect(db_path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a database in WAL mode, autocommit, with a busy timeout."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    try:
        _ensure_wal(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_wal(conn: sqlite3.Connection) -> None:
    """Switch a new database to WAL (persistent once set).

    Switching needs an exclusive lock and SQLite does not wait for it through
    the busy handler: when several processes open a new database at once, the
    losers get "database is locked" at once. Retry until WAL is on or the busy
    timeout has passed.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise SchemaError(f"{conn.execute('PRAGMA database_list').fetchone()[2]}: cannot switch to WAL journal mode")
        time.sleep(random.uniform(0.01, 0.05))


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction holding the write lock from its start; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, component: str, migrations: Sequence[Migration]) -> int:
    """Bring ``component``'s tables up to ``len(migrations)``; returns that version.

    Migration i (1-based) is applied once, atomically with its record in
    ``schema_migrations``. Concurrent openers serialize on the write lock, so
    each step runs exactly once.
    """
    target = len(migrations)
    if _applied(conn, component) == target:  # fast path without the write lock
        return target
    with immediate(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT NOT NULL, version INTEGER NOT NULL, applied_at TEXT NOT NULL,"
            " PRIMARY KEY (component, version))"
        )
        current = _applied(conn, component)
        if current > target:
            raise SchemaError(
                f"the {component} tables are at schema version {current}, newer than this Carve supports ({target}); upgrade Carve"
            )
        for version in range(current + 1, target + 1):
            for statement in migrations[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (component, version, applied_at) VALUES (?, ?, ?)",
                (component, version, datetime.now(timezone.utc).isoformat()),
            )
    return target


def _applied(conn: sqlite3.Connection, component: str) -> int:
    try:
        row = conn.execute("SELECT MAX(version) FROM schema_migrations WHERE component = ?", (component,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    return int(row[0] or 0)
