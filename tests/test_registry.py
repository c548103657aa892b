"""The adapter registry: add/list/show/remove, versions, tags, refusals that change nothing,
recovery from a failed, crashed or killed add, concurrent writers in real processes, schema
versions, and the CLI. Registry tests run on SQLite and on a real PostgreSQL (the ``database`` fixture)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import sqlalchemy as sa

from carve.adapters.registry import (
    MIGRATIONS,
    AdapterNotFound,
    AdapterRefused,
    Registry,
    RegistryError,
    adapter_names,
    adapters,
    parse_ref,
)
from carve.common.database import Database, SchemaError, database_url, schema_migrations
from carve.engine.models import resolve_model

# ---------------------------------------------------------------------------
# helpers


def dump(db: Database) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every table of the database: its columns and its rows, in a stable order."""
    tables = sa.MetaData()
    with db.engine.connect() as conn:
        tables.reflect(conn)
        return {
            name: (list(table.columns.keys()), [tuple(r) for r in conn.execute(sa.select(table).order_by(*table.columns)).all()])
            for name, table in sorted(tables.tables.items())
        }


def snapshot(reg: Registry) -> tuple[dict[str, Any], dict[str, str]]:
    """Everything a registry holds: the database's content and every stored file's hash."""
    root = reg.root
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "store").rglob("*"))
        if p.is_file()
    }
    dirs = {str(p.relative_to(root)) + "/": "" for p in (root / "store").rglob("*") if p.is_dir()}
    return dump(reg.database), {**files, **dirs}


def url_of(reg: Registry) -> str:
    """The registry's database URL, to open it again (another process would do the same)."""
    return reg.database.url.render_as_string(hide_password=False)


def scalar(reg: Registry, query: Any) -> Any:
    with reg.database.engine.connect() as conn:
        return conn.execute(query).scalar()


def variant(source: Path, dest: Path, config: dict[str, Any] | None = None, card: dict[str, Any] | None = None) -> Path:
    """A copy of an adapter folder with config fields changed and/or a card added."""
    shutil.copytree(source, dest)
    if config:
        path = dest / "adapter_config.json"
        data = json.loads(path.read_text())
        data.update(config)
        path.write_text(json.dumps(data))
    if card is not None:
        (dest / "carve-card.json").write_text(json.dumps(card))
    return dest


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def reg(tmp_path: Path, database: Optional[str]) -> Registry:
    return Registry(tmp_path / "registry", database)


@pytest.fixture()
def sqlite_reg(tmp_path: Path) -> Registry:
    """For the tests that are about the files, not the database."""
    return Registry(tmp_path / "registry")


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path):
    return resolve_model(str(tiny_model_dir))


def make_card(base, tag: str = "biomed", fingerprint: str | None = None) -> dict[str, Any]:
    return {
        "base_model": base.name,
        "base_model_id": base.model_id,
        "base_fingerprint": fingerprint or base.fingerprint,
        "domain": {"name": "Biomedicine", "tag": tag, "description": "biomedical QA"},
        "counts": {"seeds": 80, "generated": 5000},
    }


# ---------------------------------------------------------------------------
# add / list / get / versions / remove


def test_add_list_get_versions(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    first = reg.add(tiny_adapters["alpha"], "med", tags=["biomed"], base=base)
    assert (first.name, first.version, first.tags) == ("med", 1, ["biomed"])
    assert first.base_fingerprint == base.fingerprint and first.base_model_id == base.model_id
    assert first.rank == 4 and first.alpha == 8.0
    assert first.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert first.path == reg.root / "store" / "med" / "v1"
    assert first.weights_sha256 == sha(tiny_adapters["alpha"] / "adapter_model.safetensors")
    assert sha(first.path / "adapter_model.safetensors") == first.weights_sha256

    second = reg.add(tiny_adapters["beta"], "med", base=base)  # a new version inherits the tags
    other = reg.add(tiny_adapters["gamma"], "fin", tags=["finance", "news"], base=str(base.path))
    assert second.version == 2 and second.tags == ["biomed"]
    assert second.created_at >= first.created_at
    assert [(r.name, r.version) for r in reg.list()] == [("fin", 1), ("med", 2)]
    assert [r.ref for r in reg.list("news")] == ["fin:1"]
    assert reg.list("nothing") == []
    assert reg.get("med") == second and reg.get("med", 1) == first
    assert [r.version for r in reg.versions("med")] == [1, 2]
    assert other.tags == ["finance", "news"]
    reg.add(tiny_adapters["gamma"], "fin", tags=["finance"], base=base)  # newest fin no longer carries "news"
    assert [r.ref for r in reg.list("news")] == ["fin:1"] and [r.ref for r in reg.list("finance")] == ["fin:2"]

    # another Registry object (another process would do the same) sees the same records
    assert Registry(reg.root, url_of(reg)).get("fin", 1) == other


def test_remove_versions_and_never_reuse(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    for _ in range(3):
        reg.add(tiny_adapters["alpha"], "med", base=base)
    removed = reg.remove("med", 3)
    assert [r.ref for r in removed] == ["med:3"] and not removed[0].path.exists()
    assert reg.get("med").version == 2
    assert reg.add(tiny_adapters["beta"], "med", base=base).version == 4  # 3 is never handed out again
    removed = reg.remove("med")
    assert sorted(r.version for r in removed) == [1, 2, 4]
    assert reg.list() == [] and not (reg.store / "med").exists()
    assert reg.add(tiny_adapters["alpha"], "med", base=base).version == 5
    with pytest.raises(AdapterNotFound, match=r"adapter 'med' has no version 9; versions: 5"):
        reg.remove("med", 9)
    with pytest.raises(AdapterNotFound, match=r"no adapter named 'nope'; adapters: med"):
        reg.remove("nope")


def test_not_found_messages_list_what_exists(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    with pytest.raises(AdapterNotFound, match=r"adapters: \(none\)"):
        reg.get("x")
    reg.add(tiny_adapters["alpha"], "med", tags=["biomed"], base=base)
    with pytest.raises(AdapterNotFound, match=r"no adapter or domain tag named 'finance'; adapters: med; tags: biomed"):
        reg.resolve("finance")
    with pytest.raises(AdapterNotFound, match=r"no adapter carries domain tag 'law'; tags: biomed"):
        reg.tag_pointer("law")


# ---------------------------------------------------------------------------
# tags, pins, cards


def test_tag_pointer_follows_latest_and_moves_back(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    reg.add(tiny_adapters["alpha"], "med-a", tags=["biomed"], base=base)
    assert reg.tag_pointer("biomed").ref == "med-a:1"
    reg.add(tiny_adapters["beta"], "med-b", tags=["biomed"], base=base)
    reg.add(tiny_adapters["gamma"], "med-b", tags=["biomed", "clinic"], base=base)
    assert reg.tag_pointer("biomed").ref == "med-b:2"
    assert reg.resolve("biomed").ref == "med-b:2"
    assert reg.resolve("med-a").ref == "med-a:1"  # names first
    assert reg.resolve("med-b:1").version == 1

    reg.remove("med-b", 2)
    assert reg.tag_pointer("biomed").ref == "med-b:1"  # moved back
    with pytest.raises(AdapterNotFound):
        reg.tag_pointer("clinic")  # cleared: nothing carries it any more
    reg.remove("med-b")
    assert reg.tag_pointer("biomed").ref == "med-a:1"
    reg.remove("med-a")
    with pytest.raises(AdapterNotFound, match="tags: \\(none\\)"):
        reg.tag_pointer("biomed")


def test_pin_and_unpin(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    reg.add(tiny_adapters["alpha"], "med", tags=["biomed"], base=base)
    reg.add(tiny_adapters["beta"], "med", base=base)
    reg.add(tiny_adapters["gamma"], "other", base=base)
    assert reg.pin("biomed", "med", 1).ref == "med:1"
    reg.add(tiny_adapters["gamma"], "med", base=base)  # a newer version does not move a pinned tag
    assert reg.tag_pointer("biomed").ref == "med:1"
    assert reg.tags()["biomed"][0].ref == "med:1" and reg.tags()["biomed"][1] is True

    pinned = reg.pin("clinic", "other")  # pinning tags that version
    assert pinned.tags == ["clinic"] and reg.tag_pointer("clinic").ref == "other:1"

    assert reg.unpin("biomed").ref == "med:3"
    with pytest.raises(RegistryError, match="not pinned; pinned tags: clinic"):
        reg.unpin("biomed")
    reg.pin("biomed", "med", 2)
    reg.remove("med", 2)  # removing the pinned version drops the pin: the tag follows the latest again
    assert reg.tag_pointer("biomed").ref == "med:3" and reg.tags()["biomed"][1] is False


def test_card_is_read_stored_and_gives_the_default_tag(reg: Registry, tiny_adapters: dict[str, Path], base, tmp_path: Path) -> None:
    card = make_card(base, tag="biomed")
    folder = variant(tiny_adapters["alpha"], tmp_path / "carded", card=card)
    record = reg.add(folder, "med", base=base)
    assert record.tags == ["biomed"] and record.card == card
    assert json.loads((record.path / "carve-card.json").read_text()) == card
    assert reg.add(folder, "med", tags=["explicit"], base=base).tags == ["explicit"]

    # a card given to add() replaces the folder's, and is what the store keeps
    given = make_card(base, tag="pharma")
    record = reg.add(folder, "med", base=base, card=given)
    assert record.tags == ["pharma"] and json.loads((record.path / "carve-card.json").read_text()) == given


def test_only_adapter_files_are_stored(reg: Registry, tiny_adapters: dict[str, Path], tmp_path: Path, base) -> None:
    folder = variant(tiny_adapters["alpha"], tmp_path / "extra")
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "notes.txt").write_text("x")
    record = reg.add(folder, "med", base=base)
    assert sorted(p.name for p in record.path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_adapter_of_another_copy_of_the_base_is_accepted(reg: Registry, tiny_adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy-of-base")
    record = reg.add(tiny_adapters["alpha"], "med", base=str(copy))  # config names the original path
    assert record.base_fingerprint == resolve_model(str(tiny_model_dir)).fingerprint


# ---------------------------------------------------------------------------
# refusals: each names the problem and changes nothing


class PickleTrap:
    """Unpickling this creates a file: proof that pickled weights were (or were not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_weights(src: Path, tmp: Path) -> Path:
    folder = tmp / "pickled"
    folder.mkdir()
    shutil.copy(src / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(PickleTrap(tmp / "unpickled")))
    return folder


def _truncated(src: Path, tmp: Path) -> Path:
    folder = variant(src, tmp / "truncated")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:6])
    return folder


REFUSALS: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    # case -> (builds the add() arguments, expected message fragment)
    "pickle weights": (lambda s, t, b, o: {"source": _pickle_weights(s, t)}, r"weights are not safetensors \(adapter_model.bin\)"),
    "truncated safetensors": (lambda s, t, b, o: {"source": _truncated(s, t)}, "not a safetensors file"),
    "config r mismatch": (lambda s, t, b, o: {"source": variant(s, t / "r8", {"r": 8})}, "says r=8 but module"),
    "target_modules mismatch": (
        lambda s, t, b, o: {"source": variant(s, t / "tm", {"target_modules": ["q_proj"]})},
        "is not in adapter_config.json target_modules",
    ),
    "config names another base": (
        lambda s, t, b, o: {"source": variant(s, t / "ob", {"base_model_name_or_path": "google/gemma-3-270m"})},
        r"adapter made for google/gemma-3-270m \(adapter_config.json base_model_name_or_path\), base is",
    ),
    "shapes do not fit": (
        lambda s, t, b, o: {"source": variant(s, t / "anon", {"base_model_name_or_path": None}), "base": str(o)},
        "does not fit base tiny-wide",
    ),
    "adapter for the other model": (lambda s, t, b, o: {"base": str(o)}, "adapter made for .*tiny-llama"),
    "card with another fingerprint": (
        lambda s, t, b, o: {"source": variant(s, t / "card", card=make_card(b, fingerprint="sha256:" + "0" * 64) | {"base_model": "gemma3-270m"})},
        r"adapter made for gemma3-270m \(sha256:0000.*\), base is tiny-llama",
    ),
    "card not an object": (lambda s, t, b, o: {"source": variant(s, t / "c2", card=[1, 2])}, "carve-card.json: expected a JSON object"),
    "card field of the wrong type": (
        lambda s, t, b, o: {"card": {"base_fingerprint": 7}},
        "the given card: field base_fingerprint",
    ),
    "missing folder": (lambda s, t, b, o: {"source": t / "nowhere"}, "not an adapter folder"),
    "unknown base": (lambda s, t, b, o: {"base": "no-such-model"}, "base model: unknown model 'no-such-model'"),
    "name with traversal": (lambda s, t, b, o: {"name": "../x"}, "invalid adapter name '../x'"),
    "name with a newline": (lambda s, t, b, o: {"name": "a\nb"}, r"invalid adapter name 'a\\nb'"),
    "empty name": (lambda s, t, b, o: {"name": ""}, "invalid adapter name ''"),
    "name with a slash": (lambda s, t, b, o: {"name": "a/b"}, "invalid adapter name"),
    "hidden name": (lambda s, t, b, o: {"name": ".incoming-x"}, "invalid adapter name"),
    "reserved name": (lambda s, t, b, o: {"name": "auto"}, "are reserved"),
    "name differing in case": (lambda s, t, b, o: {"name": "Existing"}, "differs only in case from existing adapter 'existing'"),
    "bad tag": (lambda s, t, b, o: {"tags": ["ok", "../t"]}, "invalid domain tag '../t'"),
    "bad card tag": (lambda s, t, b, o: {"card": make_card(b, tag="bad tag")}, "invalid domain tag 'bad tag'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_change_nothing(case: str, reg: Registry, tiny_adapters: dict[str, Path], base, other_model_dir: Path, tmp_path: Path) -> None:
    reg.add(tiny_adapters["beta"], "existing", tags=["biomed"], base=base)
    before = snapshot(reg)
    build, message = REFUSALS[case]
    kwargs = {"source": tiny_adapters["alpha"], "name": "new", "base": base} | build(tiny_adapters["alpha"], tmp_path, base, other_model_dir)
    with pytest.raises(RegistryError, match=message):
        reg.add(**kwargs)
    assert snapshot(reg) == before
    assert not (tmp_path / "unpickled").exists()


def test_validation_refusals_are_also_adapter_validation_errors(reg: Registry, tiny_adapters: dict[str, Path], tmp_path: Path, base) -> None:
    from carve.artifact import AdapterValidationError

    with pytest.raises(AdapterValidationError):
        reg.add(variant(tiny_adapters["alpha"], tmp_path / "r8", {"r": 8}), "x", base=base)
    with pytest.raises(AdapterRefused):
        reg.add(variant(tiny_adapters["alpha"], tmp_path / "r2", {"r": 2}), "x", base=base)


# ---------------------------------------------------------------------------
# failures mid-add


TRIGGERS = {  # a real failure inside the database, after the folder was renamed into place: (create, drop)
    "sqlite": (
        ["CREATE TRIGGER refuse BEFORE INSERT ON adapters BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"],
        ["DROP TRIGGER refuse"],
    ),
    "postgresql": (
        [
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT ON adapters FOR EACH ROW EXECUTE FUNCTION refuse()",
        ],
        ["DROP TRIGGER refuse ON adapters", "DROP FUNCTION refuse()"],
    ),
}


def run_sql(reg: Registry, statements: list[str]) -> None:
    with reg.database.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def test_failed_insert_leaves_no_folder_and_no_version(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    reg.add(tiny_adapters["alpha"], "med", base=base)
    before = snapshot(reg)
    create, drop = TRIGGERS[reg.database.backend]
    run_sql(reg, create)
    with pytest.raises(sa.exc.DBAPIError, match="disk on fire"):
        reg.add(tiny_adapters["beta"], "med", base=base)
    assert snapshot(reg) == before
    assert not (reg.store / "med" / "v2").exists()
    run_sql(reg, drop)
    assert reg.add(tiny_adapters["beta"], "med", base=base).version == 2


def test_debris_of_a_crashed_add_is_replaced(reg: Registry, tiny_adapters: dict[str, Path], base) -> None:
    """A writer killed between rename and commit leaves a version folder without a row."""
    debris = reg.store / "med" / "v1"
    debris.mkdir(parents=True)
    (debris / "adapter_model.safetensors").write_bytes(b"half-written")
    record = reg.add(tiny_adapters["alpha"], "med", base=base)
    assert record.path == debris and sha(debris / "adapter_model.safetensors") == record.weights_sha256
    assert [p.name for p in reg.store.iterdir()] == ["med"]


class StallingRegistry(Registry):
    """Stops inside add's write transaction, after its inserts and before its commit, until it is killed."""

    def __init__(self, root: Path, database: str, stalled: Any):
        super().__init__(root, database)
        self.stalled = stalled

    def _insert(self, conn: Any, row: dict[str, Any], tags: Any) -> None:
        super()._insert(conn, row, tags)
        self.stalled.set()
        time.sleep(600)


def _add_and_stall(root: str, database: str, source: str, base_dir: str, stalled: Any) -> None:
    StallingRegistry(Path(root), database, stalled).add(Path(source), "med", tags=["killed"], base=resolve_model(base_dir))


def test_writer_killed_mid_transaction_leaves_nothing_and_the_next_writer_proceeds(
    reg: Registry, tiny_adapters: dict[str, Path], tiny_model_dir: Path, base
) -> None:
    """SIGKILL a writer holding the write transaction (version allocated, folder renamed into place, rows inserted):
    its transaction is rolled back, its lock released, and a writer queued behind it gets the version it had."""
    reg.add(tiny_adapters["alpha"], "med", tags=["biomed"], base=base)
    ctx = multiprocessing.get_context("spawn")
    stalled = ctx.Event()
    writer = ctx.Process(target=_add_and_stall, args=(str(reg.root), url_of(reg), str(tiny_adapters["gamma"]), str(tiny_model_dir), stalled))
    writer.start()
    try:
        assert stalled.wait(120), f"the writer never reached its insert (exit code {writer.exitcode})"
        done: dict[str, Any] = {}

        def queued_add() -> None:
            done["record"] = reg.add(tiny_adapters["beta"], "med", base=base)
            done["at"] = time.monotonic()

        queued = threading.Thread(target=queued_add)
        queued.start()
        queued.join(1.5)
        assert queued.is_alive(), "a second writer must wait for the lock"
        killed_at = time.monotonic()
        os.kill(writer.pid, signal.SIGKILL)
        queued.join(90)
        assert not queued.is_alive(), "the queued writer never got the lock after the kill"
    finally:
        writer.kill()
        writer.join(10)
    assert writer.exitcode == -signal.SIGKILL
    record = done["record"]
    assert done["at"] > killed_at and record.version == 2 and record.tags == ["biomed"]  # inherited from v1: the killed v2 never existed
    assert scalar(reg, sa.select(adapter_names.c.last_version).where(adapter_names.c.name == "med")) == 2
    assert [(r.version, r.weights_sha256) for r in reg.versions("med")] == [
        (1, sha(tiny_adapters["alpha"] / "adapter_model.safetensors")),
        (2, sha(tiny_adapters["beta"] / "adapter_model.safetensors")),
    ]
    assert sha(record.path / "adapter_model.safetensors") == record.weights_sha256  # the killed writer's folder was replaced
    assert sorted(str(p.relative_to(reg.store)) for p in reg.store.rglob("*") if p.is_dir()) == ["med", "med/v1", "med/v2"]
    assert "killed" not in reg.tags()
    assert scalar(reg, sa.select(sa.func.count()).select_from(adapters)) == 2


# ---------------------------------------------------------------------------
# schema versions


def test_newer_schema_is_refused(tmp_path: Path, database: Optional[str]) -> None:
    reg = Registry(tmp_path / "r", database)
    with reg.database.engine.begin() as conn:
        conn.execute(schema_migrations.insert().values(component="registry", version=99, applied_at="later"))
    before = dump(reg.database)
    with pytest.raises(SchemaError, match="registry tables in .* are at schema version 99, newer than this Carve supports"):
        Registry(tmp_path / "r", database)
    assert dump(reg.database) == before


def test_registry_of_the_previous_schema_version_migrates_on_open(tmp_path: Path, database: Optional[str], tiny_adapters: dict[str, Path], base) -> None:
    root = tmp_path / "r"
    old = Database(database_url(database, root))
    assert old.migrate("registry", MIGRATIONS[:-1]) == len(MIGRATIONS) - 1
    reg = Registry(root, database)
    with reg.database.engine.connect() as conn:
        versions = conn.execute(sa.select(schema_migrations.c.version).where(schema_migrations.c.component == "registry")).scalars()
        assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))
    assert reg.add(tiny_adapters["alpha"], "med", base=base).version == 1


# The registry's schema as the hand-written SQLite code before the database layer created it (version 1).
SQLITE_V1 = [
    "CREATE TABLE schema_migrations ("
    " component TEXT NOT NULL, version INTEGER NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (component, version))",
    "CREATE TABLE adapter_names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL)",
    "CREATE TABLE adapters ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL REFERENCES adapter_names(name), version INTEGER NOT NULL,"
    " base_model TEXT NOT NULL, base_model_id TEXT NOT NULL, base_fingerprint TEXT NOT NULL,"
    " rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL,"
    " card TEXT NOT NULL, weights_sha256 TEXT NOT NULL, path TEXT NOT NULL, created_at TEXT NOT NULL, UNIQUE (name, version))",
    "CREATE TABLE adapter_tags (adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE, tag TEXT NOT NULL, PRIMARY KEY (adapter_id, tag))",
    "CREATE INDEX adapter_tags_by_tag ON adapter_tags (tag)",
    "CREATE TABLE tag_pins (tag TEXT PRIMARY KEY, adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE)",
    "INSERT INTO schema_migrations VALUES ('registry', 1, '2025-01-01T00:00:00+00:00')",
]


def test_a_sqlite_registry_of_the_previous_carve_keeps_working(tmp_path: Path, tiny_adapters: dict[str, Path], base) -> None:
    """The same table names and schema_migrations records: a registry.sqlite3 written before the database layer opens as is."""
    root = tmp_path / "old"
    folder = shutil.copytree(tiny_adapters["alpha"], root / "store" / "med" / "v1")
    conn = sqlite3.connect(root / "registry.sqlite3", isolation_level=None)
    for statement in SQLITE_V1:
        conn.execute(statement)
    conn.execute("INSERT INTO adapter_names VALUES ('med', 1)")
    conn.execute(
        "INSERT INTO adapters (name, version, base_model, base_model_id, base_fingerprint, rank, alpha, target_modules, card,"
        " weights_sha256, path, created_at) VALUES ('med', 1, ?, ?, ?, 4, 8.0, '[\"q_proj\"]', '{}', ?, 'store/med/v1', ?)",
        (base.name, base.model_id, base.fingerprint, sha(folder / "adapter_model.safetensors"), "2025-01-01T00:00:00+00:00"),
    )
    conn.execute("INSERT INTO adapter_tags VALUES (1, 'biomed')")
    conn.close()

    reg = Registry(root)
    assert reg.resolve("biomed").ref == "med:1" and reg.get("med").path == folder
    assert reg.add(tiny_adapters["beta"], "med", base=base).version == 2
    assert reg.tag_pointer("biomed").ref == "med:2"
    assert [r.version for r in reg.versions("med")] == [1, 2]
    with sqlite3.connect(root / "registry.sqlite3") as conn:
        assert conn.execute("SELECT component, version FROM schema_migrations").fetchall() == [("registry", 1)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------
# concurrency with real processes


def _add_many(root: str, database: str, source: str, base_dir: str, name: str, count: int, barrier: Any) -> None:
    base = resolve_model(base_dir)
    barrier.wait()  # everyone opens the (new) registry and adds at the same moment
    registry = Registry(Path(root), database)
    for _ in range(count):
        registry.add(Path(source), name, tags=["shared-tag"], base=base)


def _add_and_remove(root: str, database: str, source: str, base_dir: str, name: str, count: int, barrier: Any) -> None:
    base = resolve_model(base_dir)
    barrier.wait()
    registry = Registry(Path(root), database)
    for _ in range(count):
        record = registry.add(Path(source), name, tags=["shared-tag"], base=base)
        registry.remove(name, record.version)


def run_processes(procs: list[Any], timeout: float = 150.0) -> list[int | None]:
    """Start processes, wait for all within one deadline, terminate stragglers; their exit codes."""
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    return [p.exitcode for p in procs]


def test_opening_a_new_registry_waits_for_another_writer(tmp_path: Path) -> None:
    """Switching a new database to WAL needs an exclusive lock that SQLite's busy timeout does not wait
    for: opening must retry while another connection (here: one holding a write transaction) is busy."""
    db = tmp_path / "r" / "registry.sqlite3"
    db.parent.mkdir()
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO other VALUES (1)")
    threading.Timer(0.5, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    reg = Registry(db.parent)
    assert time.monotonic() - started >= 0.4 and reg.list() == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    holder.close()


def test_concurrent_adds_in_real_processes(tmp_path: Path, tiny_adapters: dict[str, Path], tiny_model_dir: Path, database: Optional[str]) -> None:
    root = tmp_path / "registry"
    url = database_url(database, root)
    ctx = multiprocessing.get_context("spawn")
    jobs = [("same", "alpha")] * 3 + [("own-1", "beta"), ("own-2", "gamma"), ("own-3", "alpha")]
    per_process = 3
    barrier = ctx.Barrier(len(jobs) + 1, timeout=60)
    procs = [
        ctx.Process(target=_add_many, args=(str(root), url, str(tiny_adapters[src]), str(tiny_model_dir), name, per_process, barrier))
        for name, src in jobs
    ]
    # one more writer adds and removes versions of "same" meanwhile (its folders come and go)
    procs.append(ctx.Process(target=_add_and_remove, args=(str(root), url, str(tiny_adapters["beta"]), str(tiny_model_dir), "same", per_process, barrier)))
    assert run_processes(procs) == [0] * len(procs)

    reg = Registry(root, url)
    # versions handed out to "same": distinct and consecutive
    assert scalar(reg, sa.select(adapter_names.c.last_version).where(adapter_names.c.name == "same")) == 4 * per_process
    same = [r.version for r in reg.versions("same")]
    assert len(same) == 3 * per_process and set(same) <= set(range(1, 4 * per_process + 1))
    assert all(sha(r.path / "adapter_model.safetensors") == sha(tiny_adapters["alpha"] / "adapter_model.safetensors") for r in reg.versions("same"))
    for name in ("own-1", "own-2", "own-3"):
        assert [r.version for r in reg.versions(name)] == list(range(1, per_process + 1))
    if reg.database.backend == "sqlite":
        with sqlite3.connect(root / "registry.sqlite3") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert scalar(reg, sa.select(sa.func.count()).select_from(adapters)) == 6 * per_process
    assert scalar(reg, sa.select(sa.func.count()).select_from(schema_migrations)) == 1
    records = [v for r in reg.list() for v in reg.versions(r.name)]
    for record in records:
        assert sha(record.path / "adapter_model.safetensors") == record.weights_sha256
        assert record.tags == ["shared-tag"]
    folders = sorted(str(p.relative_to(reg.store)) for p in reg.store.glob("*/*"))
    assert folders == sorted(f"{r.name}/v{r.version}" for r in records)
    assert not [p for p in reg.store.iterdir() if p.name.startswith(".")]  # no staging or trash left
    latest = max(records, key=lambda r: r.created_at)
    assert reg.tag_pointer("shared-tag").ref == latest.ref


# ---------------------------------------------------------------------------
# CLI


def test_parse_ref() -> None:
    assert parse_ref("med") == ("med", None)
    assert parse_ref("med:3") == ("med", 3) and parse_ref("med:v3") == ("med", 3)
    with pytest.raises(RegistryError, match="expected NAME or NAME:VERSION"):
        parse_ref("med:x")


def test_cli_add_list_show_tag_remove(
    tmp_path: Path, tiny_adapters: dict[str, Path], tiny_model_dir: Path, other_model_dir: Path, base
) -> None:
    from typer.testing import CliRunner

    from carve.cli.app import app

    runner = CliRunner()
    root = str(tmp_path / "registry")
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(make_card(base, tag="biomed")))

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["adapters", *args, "--registry", root])
        assert result.exit_code == code, result.output
        return result.output

    assert "added med:1 [biomed]" in run("add", str(tiny_adapters["alpha"]), "--name", "med", "--base", str(tiny_model_dir), "--card", str(card_file))
    assert "added med:2 [biomed, clinic]" in run("add", str(tiny_adapters["beta"]), "-n", "med", "-t", "biomed", "-t", "clinic", "-b", str(tiny_model_dir))
    listed = json.loads(run("list", "--json"))
    assert [(r["name"], r["version"]) for r in listed] == [("med", 2)]
    assert [r["version"] for r in json.loads(run("list", "--all", "--json"))] == [1, 2]
    assert "med" in run("list") and "biomed*" in run("list")
    assert json.loads(run("list", "--all", "--json", "--base", str(tiny_model_dir)))[0]["name"] == "med"
    assert "no adapters" in run("list", "--base", str(other_model_dir))

    shown = run("show", "med:1")
    assert "med:1" in shown and '"description": "biomedical QA"' in shown and base.fingerprint in shown
    assert json.loads(run("show", "biomed", "--json"))["version"] == 2

    assert "biomed -> med:1 (pinned)" in run("tag", "biomed", "med:1")
    assert json.loads(run("tags", "--json"))["biomed"] == {"adapter": "med:1", "pinned": True}
    assert "biomed -> med:2 (follows the latest version)" in run("tag", "biomed", "--unpin")

    assert "removed med:2" in run("remove", "med:2")
    assert "removed med:1" in run("remove", "med")
    assert "no adapters" in run("list")


def test_cli_errors_exit_2_and_change_nothing(tmp_path: Path, tiny_adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from carve.cli.app import app

    runner = CliRunner()
    root = tmp_path / "registry"
    reg = Registry(root)
    reg.add(tiny_adapters["alpha"], "med", base=str(tiny_model_dir))
    before = snapshot(reg)
    bad = variant(tiny_adapters["beta"], tmp_path / "r8", {"r": 8})
    cases = [
        (["add", str(bad), "--name", "med", "--base", str(tiny_model_dir)], "says r=8"),
        (["add", str(tiny_adapters["beta"]), "--name", "../x", "--base", str(tiny_model_dir)], "invalid adapter name"),
        (["remove", "med:7"], "has no version 7; versions: 1"),
        (["show", "nope"], "no adapter or domain tag named 'nope'; adapters: med"),
        (["tag", "biomed"], "give either"),
        (["remove", "med:x"], "expected NAME or NAME:VERSION"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["adapters", *args], env={"CARVE_REGISTRY": str(root)})
        assert result.exit_code == 2, (args, result.output)
        assert "error: " in result.output and message in result.output, result.output
        assert snapshot(reg) == before


def test_cli_entry_point_in_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "CARVE_REGISTRY": str(tmp_path / "registry")}
    carve = Path(sys.executable).parent / "carve"
    ok = subprocess.run([str(carve), "adapters", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "no adapters" in ok.stdout
    bad = subprocess.run([str(carve), "adapters", "remove", "ghost"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: no adapter named 'ghost'" in bad.stderr


# ---------------------------------------------------------------------------
# several bases in one registry; the real default base (SmolLM2, headers only: quick)


def numpy_lora(folder: Path, base_dir: Path, base_id: str, modules: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 8) -> Path:
    """A PEFT LoRA folder fitting the base in ``base_dir`` (shapes read from its headers), written without torch."""
    import numpy as np
    from safetensors.numpy import save_file

    from carve.engine.adapter_checks import base_shapes_from_folder

    rng = np.random.default_rng(0)
    tensors = {}
    for module, (out_features, in_features) in base_shapes_from_folder(base_dir).items():
        if module.rsplit(".", 1)[-1] in modules:
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, in_features), dtype=np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((out_features, rank), dtype=np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
        "base_model_name_or_path": base_id, "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_reads_restricted_to_one_base(reg: Registry, tiny_adapters: dict[str, Path], base, other_model_dir: Path, tmp_path: Path) -> None:
    other = resolve_model(str(other_model_dir))
    wide = numpy_lora(tmp_path / "wide", other_model_dir, other.model_id)
    reg.add(tiny_adapters["alpha"], "med", tags=["biomed"], base=base)
    reg.add(wide, "med-wide", tags=["biomed"], base=other)
    reg.add(wide, "fin-wide", tags=["finance"], base=other)
    fp = base.fingerprint
    assert reg.tag_pointer("biomed").ref == "med-wide:1"  # across bases: the latest
    assert reg.tag_pointer("biomed", base_fingerprint=fp).ref == "med:1"
    assert [r.name for r in reg.list(base_fingerprint=fp)] == ["med"]
    assert [r.name for r in reg.list("biomed", base_fingerprint=other.fingerprint)] == ["med-wide"]
    assert sorted(reg.tags(base_fingerprint=fp)) == ["biomed"]
    reg.pin("biomed", "med-wide")
    assert reg.tags(base_fingerprint=fp)["biomed"] == (reg.get("med"), False)  # the pin is for another base
    assert reg.resolve("biomed", base_fingerprint=fp).ref == "med:1"
    with pytest.raises(AdapterNotFound, match=f"no adapter or domain tag named 'fin-wide' for base {fp}; adapters: med; tags: biomed"):
        reg.resolve("fin-wide", base_fingerprint=fp)
    with pytest.raises(AdapterNotFound, match="no adapter named 'fin-wide' for base"):
        reg.get("fin-wide", base_fingerprint=fp)


@pytest.mark.integration
def test_default_base_is_smollm2(sqlite_reg: Registry, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    smol = resolve_model("smollm2-135m-instruct")
    record = sqlite_reg.add(numpy_lora(tmp_path / "smol-lora", smol.path, "HuggingFaceTB/SmolLM2-135M-Instruct"), "smol-med", tags=["biomed"])
    assert record.base_model == "smollm2-135m-instruct" and record.base_model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (record.rank, record.alpha, record.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    before = snapshot(sqlite_reg)
    with pytest.raises(AdapterRefused, match=r"adapter made for .*tiny-llama.*, base is smollm2-135m-instruct"):
        sqlite_reg.add(tiny_adapters["alpha"], "tiny-on-smol")
    assert snapshot(sqlite_reg) == before


def test_stored_adapter_loads_with_peft(sqlite_reg: Registry, tiny_adapters: dict[str, Path], tiny_model_dir: Path, base) -> None:
    """What the store holds is a standard PEFT folder: peft loads it and gets the source's weights."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    record = sqlite_reg.add(tiny_adapters["beta"], "med", base=base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), record.path, adapter_name="med")
    source = load_file(str(tiny_adapters["beta"] / "adapter_model.safetensors"))
    key = next(k for k in source if "q_proj.lora_A" in k)
    module = model.get_submodule(key.removesuffix(".lora_A.weight"))
    assert torch.equal(module.lora_A["med"].weight, source[key])
