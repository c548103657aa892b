"""The database layer: which database a setting selects, URL errors, the write lock on each backend,
numbered migrations, the mount-table check, and the rule that keeps SQLite off a cluster's network filesystem."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Optional

import pytest
import sqlalchemy as sa
from sqlalchemy.schema import CreateTable
from typer.testing import CliRunner

from carve.cli.app import app
from carve.common.database import (
    DATABASE_URL_ENV,
    ClusterAdvice,
    Database,
    DatabaseError,
    SchemaError,
    _lock_key,
    check_for_cluster,
    cluster_advice,
    database_url,
    parse_url,
    schema_migrations,
)
from carve.common.mounts import filesystem_type, is_network_filesystem, parse_mounts

UNREACHABLE = "postgresql://carve:s3cret@127.0.0.1:1/carve"  # nothing listens on port 1 (and no network but loopback)

# -- which database ---------------------------------------------------------------------


def test_one_setting_selects_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path}/registry.sqlite3"  # the default: as before the database layer
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://u@db/carve")
    assert database_url(None, tmp_path) == "postgresql://u@db/carve"
    assert database_url("sqlite:////elsewhere/x.db", tmp_path) == "sqlite:////elsewhere/x.db"  # the flag or config field wins
    assert parse_url("postgresql://u@db/carve").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u@db/carve").drivername == "postgresql+psycopg"


@pytest.mark.parametrize(
    "url, message",
    [
        ("mysql://carve:s3cret@db/carve", "unsupported database URL 'mysql://carve:***@db/carve': expected sqlite:///PATH or postgresql://"),
        ("postgresql+psycopg2://carve:s3cret@db/carve", "unsupported database URL 'postgresql+psycopg2://carve:***@db/carve'"),
        ("postgresql://carve:s3cret@db:port/carve", "invalid database URL 'postgresql://...': expected"),
        ("just some words", "invalid database URL '...'"),
        ("sqlite://", "names no file"),
    ],
)
def test_a_bad_url_is_refused_naming_it_without_its_password(url: str, message: str, tmp_path: Path) -> None:
    from carve.adapters.registry import Registry

    with pytest.raises(DatabaseError) as err:
        Registry(tmp_path / "r", url)
    assert message in str(err.value) and "s3cret" not in str(err.value)
    assert not (tmp_path / "r" / "registry.sqlite3").exists()


def test_an_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    from carve.adapters.registry import Registry
    from carve.jobs.store import JobStore

    for open_it in (Registry, JobStore):
        with pytest.raises(DatabaseError) as err:
            open_it(tmp_path / "r", UNREACHABLE)
        text = str(err.value)
        assert text.startswith("cannot open database postgresql://carve:***@127.0.0.1:1/carve: ") and "\n" not in text
        assert "s3cret" not in text and err.value.__cause__ is None
    assert not (tmp_path / "r").exists()  # nothing created


def test_cli_database_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["adapters", "list", "--database", UNREACHABLE], "error: cannot open database postgresql://carve:***@127.0.0.1:1/carve: "),
        (["adapters", "list", "--database", "mysql://carve:s3cret@db/x"], "error: unsupported database URL 'mysql://carve:***@db/x'"),
        (["serve", "--database", UNREACHABLE], "error: cannot open database postgresql://carve:***@127.0.0.1:1/carve: "),  # before any Ray
        (["serve", "--database", "mysql://carve:s3cret@db/x"], "unsupported database URL 'mysql://carve:***@db/x'"),
        (["submit", str(tmp_path / "seeds.jsonl"), "--tag", "t", "--database", UNREACHABLE], "error: cannot open database"),
    ]
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "Say hi.", "input": "", "output": "hi"}\n')
    for args, message in cases:
        result = runner.invoke(app, [*args, "--registry", str(tmp_path / "r")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "s3cret" not in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(app, ["adapters", "list", "--registry", str(tmp_path / "r")], env={DATABASE_URL_ENV: UNREACHABLE})
    assert result.exit_code == 2 and "cannot open database postgresql://carve:***@127.0.0.1" in result.output


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_cli_on_postgresql_by_flag_and_by_environment(tmp_path: Path, tiny_adapters: dict[str, Path], tiny_model_dir: Path, database: str) -> None:
    runner = CliRunner()
    root = str(tmp_path / "registry")
    added = runner.invoke(app, ["adapters", "add", str(tiny_adapters["alpha"]), "-n", "med", "-t", "biomed", "-b", str(tiny_model_dir),
                                "--registry", root, "--database", database])
    assert added.exit_code == 0 and "added med:1 [biomed]" in added.output, added.output
    listed = runner.invoke(app, ["adapters", "list", "--json", "--registry", root], env={DATABASE_URL_ENV: database})
    assert listed.exit_code == 0 and '"name": "med"' in listed.output, listed.output
    assert not (tmp_path / "registry" / "registry.sqlite3").exists()
    local = runner.invoke(app, ["adapters", "list", "--registry", root], env={DATABASE_URL_ENV: ""})  # the folder's own SQLite: empty
    assert local.exit_code == 0 and "no adapters" in local.output


def test_serve_config_takes_the_database_from_the_environment_and_hides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from carve.platform.config import ServeConfig

    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://carve:s3cret@db/carve")
    config = ServeConfig.from_env()
    assert config.database_url == "postgresql://carve:s3cret@db/carve" and config.database() == config.database_url
    assert "s3cret" not in repr(config)
    assert ServeConfig.from_env(database_url="sqlite:////srv/r.db").database_url == "sqlite:////srv/r.db"
    with pytest.raises(ValidationError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h/d'"):
        ServeConfig(database_url="mysql://u:pw@h/d")


# -- the write lock, held from the start of every write transaction --------------------------------


def test_the_write_lock_is_taken_when_the_transaction_begins(tmp_path: Path, database: Optional[str]) -> None:
    """Before any write statement, another writer of the same component cannot get in; after the block it can."""
    db = Database(database_url(database, tmp_path))
    with db.write("registry") as conn:
        if db.backend == "sqlite":
            other = sqlite3.connect(tmp_path / "registry.sqlite3", timeout=0, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        else:
            with db.engine.connect() as other_conn:
                def taken(key: int) -> bool:
                    return not other_conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(key))).scalar()

                assert taken(_lock_key("registry")) and not taken(_lock_key("jobs"))  # per component
                other_conn.rollback()
                # like SQLite's busy timeout: a write waits for the lock, and may idle holding it, 60 s at most
                assert other_conn.execute(sa.select(sa.func.current_setting("lock_timeout"))).scalar() == "0"
            assert [conn.execute(sa.select(sa.func.current_setting(name))).scalar() for name in ("lock_timeout", "idle_in_transaction_session_timeout")] == ["1min", "1min"]
    if db.backend == "sqlite":
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
    else:
        with db.engine.connect() as other_conn:
            assert other_conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(_lock_key("registry")))).scalar()


def test_a_failing_write_transaction_changes_nothing(tmp_path: Path, database: Optional[str]) -> None:
    db = Database(database_url(database, tmp_path))
    db.migrate("demo", DEMO_MIGRATIONS[:1])
    with pytest.raises(RuntimeError, match="midway"):
        with db.write("demo") as conn:
            conn.execute(demo.insert().values(id=1, name="a"))
            raise RuntimeError("midway")
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(demo)).scalar() == 0


# -- numbered migrations --------------------------------------------------------------------


_demo_tables = sa.MetaData()
demo = sa.Table("demo", _demo_tables, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text, nullable=False))
demo_notes = sa.Table("demo_notes", _demo_tables, sa.Column("demo_id", sa.Integer, sa.ForeignKey("demo.id"), primary_key=True), sa.Column("note", sa.Text))
DEMO_MIGRATIONS = [
    [CreateTable(demo)],
    [CreateTable(demo_notes), demo_notes.insert().from_select(["demo_id", "note"], sa.select(demo.c.id, sa.literal("migrated")))],
]


def applied(db: Database, component: str) -> list[int]:
    with db.read() as conn:
        query = sa.select(schema_migrations.c.version).where(schema_migrations.c.component == component).order_by(schema_migrations.c.version)
        return list(conn.execute(query).scalars())


def test_migrations_apply_once_in_order_keeping_the_data(tmp_path: Path, database: Optional[str]) -> None:
    db = Database(database_url(database, tmp_path))
    assert db.migrate("demo", DEMO_MIGRATIONS[:1]) == 1
    with db.write("demo") as conn:
        conn.execute(demo.insert().values(id=7, name="kept"))
    assert db.migrate("demo", DEMO_MIGRATIONS) == 2 and applied(db, "demo") == [1, 2]
    assert db.migrate("demo", DEMO_MIGRATIONS) == 2 and applied(db, "demo") == [1, 2]  # once
    with db.read() as conn:
        assert conn.execute(sa.select(demo_notes)).all() == [(7, "migrated")]
    with pytest.raises(SchemaError, match="demo tables in .* are at schema version 2, newer than this Carve supports \\(1\\); upgrade Carve"):
        db.migrate("demo", DEMO_MIGRATIONS[:1])


def test_a_failing_migration_is_rolled_back_whole(tmp_path: Path, database: Optional[str]) -> None:
    db = Database(database_url(database, tmp_path))
    db.migrate("demo", DEMO_MIGRATIONS[:1])
    broken = [DEMO_MIGRATIONS[0], [CreateTable(demo_notes), CreateTable(demo)]]  # the second statement fails: demo exists
    with pytest.raises((sa.exc.DBAPIError, DatabaseError), match="already exists"):  # SQLite reports it as an OperationalError
        db.migrate("demo", broken)
    assert applied(db, "demo") == [1]
    with db.read() as conn:
        assert not sa.inspect(conn).has_table("demo_notes")
    assert db.migrate("demo", DEMO_MIGRATIONS) == 2  # and the right one applies afterwards


def test_concurrent_first_opens_migrate_once(tmp_path: Path, database: Optional[str]) -> None:
    """Threads opening a new database at once: each migration runs exactly once (the processes case: test_registry)."""
    url = database_url(database, tmp_path)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            Database(url).migrate("demo", DEMO_MIGRATIONS)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and applied(Database(url), "demo") == [1, 2]


# -- the filesystem under a SQLite file, and when a cluster may use it ----------------------------------


MOUNTS = "\n".join([
    "sysfs /sys sysfs rw,nosuid 0 0",
    "/dev/sda1 / ext4 rw,relatime 0 0",
    "server:/export /data nfs4 rw,vers=4.2 0 0",
    "/dev/sdb1 /data/local ext4 rw 0 0",
    r"//nas/share /mnt/my\040share cifs rw 0 0",
    "s3fs /mnt/bucket fuse.s3fs rw 0 0",
    "/dev/sdc1 /mnt/usb fuseblk rw 0 0",
    "10.0.0.1:6789:/ /ceph ceph rw 0 0",
    "overlay / overlay rw 0 0",  # a later mount on the same point hides the earlier one
    "",
])


@pytest.mark.parametrize(
    "path, fstype",
    [
        ("/data/carve/registry/registry.sqlite3", "nfs4"),
        ("/data", "nfs4"),
        ("/data/local/registry.sqlite3", "ext4"),  # the deeper mount point
        ("/database/registry.sqlite3", "overlay"),  # /data is not a prefix of /database
        ("/mnt/my share/registry.sqlite3", "cifs"),
        ("/mnt/bucket/r/registry.sqlite3", "fuse.s3fs"),
        ("/mnt/usb/registry.sqlite3", "fuseblk"),
        ("/ceph/registry.sqlite3", "ceph"),
        ("/home/me/.carve/registry/registry.sqlite3", "overlay"),
    ],
)
def test_filesystem_type_from_a_mount_table(path: str, fstype: str) -> None:
    assert filesystem_type(Path(path), MOUNTS) == fstype


def test_filesystem_type_follows_symlinks_and_reads_the_real_table(tmp_path: Path) -> None:
    (tmp_path / "shared").symlink_to("/data/carve")
    assert filesystem_type(tmp_path / "shared" / "registry.sqlite3", MOUNTS) == "nfs4"
    assert filesystem_type(tmp_path, "") is None
    assert isinstance(filesystem_type(tmp_path), str)  # this machine's /proc/mounts
    assert [m.point for m in parse_mounts(MOUNTS)][4] == "/mnt/my share"
    assert [t for t in ("nfs", "nfs4", "cifs", "smb3", "ceph", "9p", "fuse.sshfs", "fuse.juicefs") if not is_network_filesystem(t)] == []
    assert [t for t in ("ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "fuseblk") if is_network_filesystem(t)] == []


SQLITE = "sqlite:////data/carve/registry/registry.sqlite3"


@pytest.mark.parametrize(
    "url, nodes, fstype, refuse",
    [
        (SQLITE, 3, "nfs4", True),
        (SQLITE, 2, "fuse.s3fs", True),
        (SQLITE, 2, "ceph", True),
        (SQLITE, 3, "ext4", False),  # a warning: each node would open its own file
        (SQLITE, 2, None, False),
        (SQLITE, 1, "nfs4", None),  # one node: one process tree locking one file is fine
        ("postgresql://carve@db/carve", 8, None, None),
    ],
)
def test_which_database_a_cluster_may_use(url: str, nodes: int, fstype: Optional[str], refuse: Optional[bool]) -> None:
    advice = cluster_advice(url, nodes, fstype)
    assert (advice.refuse if advice else None) == refuse
    if refuse:
        assert advice is not None
        assert f"on a network filesystem ({fstype}) and the Ray cluster has {nodes} nodes" in advice.reason
        assert "SQLite's locking does not work over a network filesystem" in advice.reason and "use PostgreSQL" in advice.reason


def test_check_for_cluster_reaches_the_database_first(tmp_path: Path) -> None:
    advice = check_for_cluster(UNREACHABLE, 1)
    assert advice is not None and advice.refuse and advice.reason.startswith("cannot open database postgresql://carve:***@")
    assert check_for_cluster(f"sqlite:///{tmp_path}/registry.sqlite3", 1) is None
    local = check_for_cluster(f"sqlite:///{tmp_path}/registry.sqlite3", 2)
    assert isinstance(local, ClusterAdvice) and not local.refuse  # this machine's tmp is a local filesystem


def test_the_launcher_refuses_or_warns_before_deploying(tmp_path: Path) -> None:
    from carve.platform.config import ServeConfig
    from carve.platform.launcher import _judged, database_check

    local = ServeConfig(registry_root=tmp_path, database_url=f"sqlite:///{tmp_path}/registry.sqlite3")
    assert _judged(database_check(local, 1)) == ()
    (warning,) = _judged(database_check(local, 3))
    assert "the Ray cluster has 3 nodes" in warning and "use PostgreSQL" in warning
    with pytest.raises(DatabaseError, match="cannot open database postgresql://carve:\\*\\*\\*@127.0.0.1:1/carve"):
        _judged(database_check(ServeConfig(database_url=UNREACHABLE), 1))
    with pytest.raises(DatabaseError, match="on a network filesystem \\(nfs4\\)"):
        _judged(cluster_advice(SQLITE, 2, "nfs4"))
