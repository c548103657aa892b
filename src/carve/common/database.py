"""The one database of a Carve installation: SQLite on one machine, PostgreSQL for a cluster.

The adapter registry and the specialization jobs keep their tables in one
database, chosen by one setting: ``--database`` / ``ServeConfig.database_url``,
else ``CARVE_DATABASE_URL``, else the SQLite file ``registry.sqlite3`` in the
registry folder. Both backends give the same guarantees to several writing
processes (the CLI, a server, a job):

- **SQLite**: WAL (readers never block the writer), a busy timeout (writers
  queue instead of failing) and ``BEGIN IMMEDIATE`` for every write
  transaction, so the write lock is taken up front and a read-then-write
  ("allocate the next version") never interleaves with another writer's.
- **PostgreSQL**: every write transaction first takes a transaction-level
  advisory lock named after its component (``pg_advisory_xact_lock``), so the
  writers of one component queue exactly as on SQLite, at READ COMMITTED: each
  statement after the lock sees every write committed before it. The lock goes
  with the transaction, also when its process dies (the server aborts the
  transaction of a closed connection). As SQLite's busy timeout bounds the
  wait, ``lock_timeout`` does here, and ``idle_in_transaction_session_timeout``
  ends a writer that holds the lock but has stopped (the same 60 s).

Schema changes are numbered per component in ``schema_migrations`` (the same
numbers on both backends, written as SQLAlchemy Core DDL), applied once each,
atomically with their record, under one lock shared by all components; a
database at a newer version than this Carve knows is refused, not misread.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from carve.common.mounts import filesystem_type, is_network_filesystem

DATABASE_URL_ENV = "CARVE_DATABASE_URL"
SQLITE_FILE = "registry.sqlite3"
BUSY_TIMEOUT_S = 60.0
SUPPORTED = "sqlite:///PATH or postgresql://USER:PASSWORD@HOST[:PORT]/DATABASE"

Migration = Sequence[sa.Executable]  # one schema version: Core DDL (and data) statements applied in one transaction

_metadata = sa.MetaData()
schema_migrations = sa.Table(
    "schema_migrations",
    _metadata,
    sa.Column("component", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.Text, nullable=False),
)
_MIGRATIONS_LOCK = "schema_migrations"
_WRITE = "carve_write"  # execution option: this connection's next transaction writes
_PG_TIMEOUTS = ("lock_timeout", "idle_in_transaction_session_timeout")  # a write waits, and idles, at most BUSY_TIMEOUT_S


class DatabaseError(RuntimeError):
    """The database cannot be opened or used; the message names it (without its password)."""


class SchemaError(DatabaseError):
    """The database's schema is not one this Carve can use."""


# -- which database ---------------------------------------------------------------


def database_url(database: Optional[str], root: Path) -> str:
    """The database setting in force: ``database`` when given, else CARVE_DATABASE_URL, else the SQLite file in ``root``."""
    chosen = database or os.environ.get(DATABASE_URL_ENV) or None
    if chosen is None:
        return URL.create("sqlite", database=str(Path(root).expanduser().absolute() / SQLITE_FILE)).render_as_string()
    return chosen


def parse_url(text: str) -> URL:
    """A database URL, checked: DatabaseError naming it (password hidden) when malformed or not SQLite/PostgreSQL."""
    try:
        url = sa.make_url(text)
    except (sa.exc.ArgumentError, ValueError):
        raise DatabaseError(f"invalid database URL {_hide_password(text)!r}: expected {SUPPORTED}") from None
    backend, _, driver = url.drivername.partition("+")
    if backend == "postgres":  # the spelling of many hosting providers
        backend = "postgresql"
    if backend == "sqlite" and driver in ("", "pysqlite"):
        if not url.database or url.database == ":memory:":
            raise DatabaseError(f"database URL {safe_url(url)!r} names no file: expected sqlite:///PATH")
        return url.set(drivername="sqlite")
    if backend == "postgresql" and driver in ("", "psycopg"):
        return url.set(drivername="postgresql+psycopg")
    raise DatabaseError(f"unsupported database URL {safe_url(url)!r}: expected {SUPPORTED}")


def safe_url(url: URL | str) -> str:
    """The URL as it may be printed: the password replaced by ***."""
    if isinstance(url, str):
        return _hide_password(url)
    return url.render_as_string(hide_password=True)


def _hide_password(text: str) -> str:
    try:
        return sa.make_url(text).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):  # not even a URL: keep only the scheme
        scheme, sep, _ = text.partition("://")
        return f"{scheme}://..." if sep else "..."


def sqlite_path(url: str) -> Optional[Path]:
    """The file of a SQLite URL; None for another database."""
    parsed = parse_url(url)
    return Path(parsed.database).expanduser() if parsed.get_backend_name() == "sqlite" and parsed.database else None


# -- engines ------------------------------------------------------------------------

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def _engine(url: URL) -> Engine:
    """One engine (and, for PostgreSQL, one connection pool) per database per process; a forked child makes its own."""
    key = (os.getpid(), url.render_as_string(hide_password=False))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _sqlite_engine(url) if url.get_backend_name() == "sqlite" else sa.create_engine(url, pool_pre_ping=True)
            _engines[key] = engine
        return engine


def _sqlite_engine(url: URL) -> Engine:
    """A connection per use (as cheap as opening the file), WAL, foreign keys, and transactions Carve begins itself."""
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver begins nothing; _on_begin does
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        _ensure_wal(dbapi_connection, url)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def _ensure_wal(conn: sqlite3.Connection, url: URL) -> None:
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
            raise DatabaseError(f"database {safe_url(url)}: cannot switch to WAL journal mode (still locked after {BUSY_TIMEOUT_S:g} s)")
        time.sleep(random.uniform(0.01, 0.05))


def dispose_engines(url: Optional[str] = None) -> None:
    """Close this process's pooled connections (to the database at ``url``, or to all)."""
    wanted = None if url is None else parse_url(url).render_as_string(hide_password=False)
    with _engines_lock:
        gone = [_engines.pop(k) for k in list(_engines) if k[0] == os.getpid() and wanted in (None, k[1])]
    for engine in gone:
        engine.dispose()


# -- the database -------------------------------------------------------------------


class Database:
    """One Carve database; ``read()`` and ``write(component)`` hand out connections with the guarantees above."""

    def __init__(self, url: str):
        self.url = parse_url(url)
        self.name = safe_url(url)  # as given (postgresql://...), password hidden
        self.backend = self.url.get_backend_name()
        if self.backend == "sqlite":
            Path(self.url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = _engine(self.url)

    def __repr__(self) -> str:
        return f"Database({self.name!r})"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads; its transaction is rolled back when the block ends."""
        with self._errors(), self._connect() as conn:
            yield conn

    @contextmanager
    def write(self, component: str) -> Iterator[Connection]:
        """One write transaction holding ``component``'s write lock from its start; committed at the end, rolled back on any error."""
        with self._errors(), self._connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                if self.backend == "postgresql":
                    timeout = f"{int(BUSY_TIMEOUT_S * 1000)}ms"
                    conn.execute(sa.select(*(sa.func.set_config(name, timeout, True) for name in _PG_TIMEOUTS)))  # this transaction only
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(component))))
                yield conn

    def ping(self) -> None:
        """Connect once: DatabaseError naming the database when it cannot be reached."""
        with self.read() as conn:
            conn.execute(sa.select(1))

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Bring ``component``'s tables up to version ``len(migrations)``; returns that version.

        Migration i (1-based) is applied once, atomically with its record in
        ``schema_migrations``; concurrent openers queue on one lock, so each
        step runs exactly once. SchemaError when the database is newer.
        """
        target = len(migrations)
        with self.read() as conn:
            if _applied(conn, component) == target:  # the usual case, without the lock
                return target
        with self.write(_MIGRATIONS_LOCK) as conn:
            schema_migrations.create(conn, checkfirst=True)
            current = _applied(conn, component)
            if current > target:
                raise SchemaError(
                    f"the {component} tables in {self.name} are at schema version {current}, "
                    f"newer than this Carve supports ({target}); upgrade Carve"
                )
            for version in range(current + 1, target + 1):
                for statement in migrations[version - 1]:
                    conn.execute(statement)
                conn.execute(
                    schema_migrations.insert().values(
                        component=component, version=version, applied_at=datetime.now(timezone.utc).isoformat()
                    )
                )
        return target

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except (sa.exc.DBAPIError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open database {self.name}: {_first_line(exc)}") from None

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A database that fails under us (server gone, disk full, lock wait past the timeout) names itself."""
        try:
            yield
        except sa.exc.OperationalError as exc:
            raise DatabaseError(f"database {self.name}: {_first_line(exc)}") from exc


# -- which database a cluster may use --------------------------------------------


class ClusterAdvice(NamedTuple):
    """What to do about a database for a server on several nodes: refuse to start, or start and warn."""

    refuse: bool
    reason: str


def cluster_advice(url: str, nodes: int, fstype: Optional[str]) -> Optional[ClusterAdvice]:
    """Whether a server spread over ``nodes`` Ray nodes may use the database at ``url``; ``fstype`` is the type of
    the filesystem holding its SQLite file (None: unknown). None when nothing is wrong."""
    path = sqlite_path(url)
    if path is None or nodes <= 1:
        return None
    use = f"use PostgreSQL on a cluster (--database postgresql://... or {DATABASE_URL_ENV})"
    if fstype is not None and is_network_filesystem(fstype):
        return ClusterAdvice(
            True,
            f"the SQLite database {path} is on a network filesystem ({fstype}) and the Ray cluster has {nodes} nodes: "
            f"SQLite's locking does not work over a network filesystem (SQLite's documentation says so), "
            f"so concurrent writers could corrupt it; {use}",
        )
    return ClusterAdvice(
        False,
        f"the SQLite database {path} is on a local filesystem ({fstype or 'type unknown'}) and the Ray cluster has {nodes} nodes: "
        f"a replica or job on another node opens its own file, not this one; {use}",
    )


def check_for_cluster(url: str, nodes: int) -> Optional[ClusterAdvice]:
    """Run where the server runs: reach the database at ``url`` and judge it for ``nodes`` nodes.

    Refuses (``refuse=True``, with the reason) a database that cannot be
    reached and a SQLite file on a network filesystem when ``nodes`` > 1;
    warns about a SQLite file on local disk with ``nodes`` > 1.
    """
    try:
        Database(url).ping()
    except DatabaseError as exc:
        return ClusterAdvice(True, str(exc))
    path = sqlite_path(url)
    return cluster_advice(url, nodes, filesystem_type(path) if path else None)


def _applied(conn: Connection, component: str) -> int:
    if not sa.inspect(conn).has_table(schema_migrations.name):
        return 0
    query = sa.select(sa.func.max(schema_migrations.c.version)).where(schema_migrations.c.component == component)
    return int(conn.execute(query).scalar() or 0)


def _lock_key(component: str) -> int:
    """A stable signed 64-bit advisory-lock key per component (the same in every process and Carve version)."""
    return int.from_bytes(hashlib.sha256(f"carve:{component}".encode()).digest()[:8], "big", signed=True)


def _first_line(exc: BaseException) -> str:
    """The driver's own message, without SQLAlchemy's statement dump and background link."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip()
    return text.splitlines()[0] if text else type(inner).__name__


__all__ = [
    "ClusterAdvice",
    "DATABASE_URL_ENV",
    "Database",
    "DatabaseError",
    "Migration",
    "SQLITE_FILE",
    "SchemaError",
    "check_for_cluster",
    "cluster_advice",
    "database_url",
    "dispose_engines",
    "parse_url",
    "safe_url",
    "sqlite_path",
]
