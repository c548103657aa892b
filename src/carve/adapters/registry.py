"""The adapter registry: which LoRA adapters exist, for which base, under which domain tags.

One SQLite database (``registry.sqlite3``) records the adapters; their files
live in ``store/<name>/v<version>/`` next to it. Adding is all-or-nothing:
the adapter is validated first, copied into a hidden staging folder, fsynced,
then, holding the database's write lock, given the next version number,
renamed into place and recorded in one transaction. A failure at any step
leaves neither a row nor a folder, and concurrent writers (several processes)
queue on the lock, so versions never collide.

Versions of a name count up and are never reused, even after removal. A
domain tag points to the most recently added adapter version carrying it,
unless the tag is pinned to a version (``pin``); removing what a tag points
to moves it back to the previous version carrying the tag, or clears it.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

from carve.adapters.intake import fsync_dir, inspect_adapter, stage_copy
from carve.adapters.sqlite import connect, immediate, migrate
from carve.artifact import RESERVED_NAMES, AdapterValidationError, check_name
from carve.common.hashing import sha256_file
from carve.common.paths import registry_dir
from carve.engine.models import (
    DEFAULT_MODEL,
    ModelError,
    ResolvedModel,
    resolve_model,
)

DB_FILE = "registry.sqlite3"
STORE_DIR = "store"
STALE_STAGING_S = 24 * 3600

MIGRATIONS: list[list[str]] = [
    [  # 1: adapters, their tags, tag pins; adapter_names keeps each name's version counter
        "CREATE TABLE adapter_names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL)",
        "CREATE TABLE adapters ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " name TEXT NOT NULL REFERENCES adapter_names(name),"
        " version INTEGER NOT NULL,"
        " base_model TEXT NOT NULL, base_model_id TEXT NOT NULL, base_fingerprint TEXT NOT NULL,"
        " rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL,"
        " card TEXT NOT NULL, weights_sha256 TEXT NOT NULL, path TEXT NOT NULL, created_at TEXT NOT NULL,"
        " UNIQUE (name, version))",
        "CREATE TABLE adapter_tags ("
        " adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,"
        " tag TEXT NOT NULL, PRIMARY KEY (adapter_id, tag))",
        "CREATE INDEX adapter_tags_by_tag ON adapter_tags (tag)",
        "CREATE TABLE tag_pins ("
        " tag TEXT PRIMARY KEY,"
        " adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE)",
    ],
]
_REF = re.compile(r"^(?P<name>[^:]*)(?::v?(?P<version>\d+))?$")


class RegistryError(ValueError):
    """A registry operation was refused; the message names the problem. Nothing was changed."""


class AdapterNotFound(RegistryError):
    """No such adapter, version or tag; the message lists what exists."""


class AdapterRefused(RegistryError, AdapterValidationError):
    """An adapter failed validation against its files or the base model."""


class AdapterRecord(BaseModel):
    """One stored adapter version, as the registry reports it."""

    name: str
    version: int
    tags: list[str]
    base_model_id: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: list[str]
    card: dict[str, Any]
    path: Path
    created_at: datetime
    base_model: str = ""
    weights_sha256: str = ""

    @property
    def ref(self) -> str:
        """``name:version``, the form the CLI and HTTP API accept."""
        return f"{self.name}:{self.version}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``NAME[:VERSION]`` (``NAME:v3`` works too)."""
    match = _REF.fullmatch(ref)
    if not match:
        raise RegistryError(f"invalid adapter reference {ref!r}: expected NAME or NAME:VERSION")
    version = match["version"]
    return match["name"], int(version) if version is not None else None


def check_label(value: str, what: str) -> str:
    """An adapter name or tag: safe as a folder and URL part, and not a reserved word."""
    try:
        check_name(value, what)
    except AdapterValidationError as exc:
        raise RegistryError(str(exc)) from exc
    if value.lower() in RESERVED_NAMES:
        raise RegistryError(f"invalid {what} {value!r}: {', '.join(sorted(RESERVED_NAMES))} are reserved")
    return value


class Registry:
    """Adapters on disk plus their records in SQLite; safe to share between processes."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root).expanduser() if root is not None else registry_dir()
        self.db_path = self.root / DB_FILE
        self.store = self.root / STORE_DIR
        self.store.mkdir(parents=True, exist_ok=True)
        with closing(connect(self.db_path)) as conn:
            migrate(conn, "registry", MIGRATIONS)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.db_path)

    # -- writing --------------------------------------------------------------

    def add(
        self,
        source: Path,
        name: str,
        tags: Sequence[str] = (),
        base: str | ResolvedModel = DEFAULT_MODEL,
        card: dict | None = None,
    ) -> AdapterRecord:
        """Validate an adapter folder for ``base`` and store it as the next version of ``name``.

        Tags default to the card's domain.tag, else to the tags of the name's
        latest version. Raises AdapterRefused (bad adapter) or RegistryError
        (bad name, tag or base); nothing changes then.
        """
        check_label(name, "adapter name")
        resolved = _resolve_base(base)
        try:
            intake = inspect_adapter(Path(source), resolved, card)
        except AdapterValidationError as exc:
            raise AdapterRefused(str(exc)) from exc
        wanted = list(tags) or ([intake.card_tag] if intake.card_tag else [])
        tag_list = sorted({check_label(t, "domain tag") for t in wanted})

        self._sweep_staging()
        try:
            staging = stage_copy(intake, self.store, card)
        except AdapterValidationError as exc:
            raise AdapterRefused(str(exc)) from exc
        target: Path | None = None
        try:
            weights_sha256 = sha256_file(staging / "adapter_model.safetensors")
            with closing(self._connect()) as conn:
                try:
                    with immediate(conn):
                        self._check_case_clash(conn, name)
                        if not tag_list:  # a new version keeps serving its predecessor's domains
                            tag_list = self._latest_tags(conn, name)
                        version = self._next_version(conn, name)
                        target = self.store / name / f"v{version}"
                        self._claim(target)
                        os.rename(staging, target)
                        fsync_dir(target.parent)
                        created = datetime.now(timezone.utc)
                        cursor = conn.execute(
                            "INSERT INTO adapters (name, version, base_model, base_model_id, base_fingerprint, rank, alpha,"
                            " target_modules, card, weights_sha256, path, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (
                                name, version, resolved.name, resolved.model_id, resolved.fingerprint,
                                intake.files.rank, intake.files.alpha, json.dumps(list(intake.files.target_modules)),
                                json.dumps(intake.card, sort_keys=True), weights_sha256,
                                target.relative_to(self.root).as_posix(), created.isoformat(),
                            ),
                        )
                        conn.executemany(
                            "INSERT INTO adapter_tags (adapter_id, tag) VALUES (?, ?)",
                            [(cursor.lastrowid, t) for t in tag_list],
                        )
                except BaseException:
                    if target is not None and target.exists() and not staging.exists():
                        shutil.rmtree(target, ignore_errors=True)
                    raise
                return self._get(conn, name, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str, version: int | None = None) -> builtins.list[AdapterRecord]:
        """Remove one version of ``name``, or all of them; returns what was removed.

        Tags pointing at a removed version fall back to the previous version
        carrying them (pins on it are dropped).
        """
        with closing(self._connect()) as conn:
            moved: list[tuple[Path, Path]] = []
            try:
                with immediate(conn):
                    records = [self._get(conn, name, version)] if version is not None else self._versions(conn, name)
                    if not records:
                        self._get(conn, name)  # raises AdapterNotFound listing names
                    for record in records:
                        trash = self.store / f".trash-{uuid.uuid4().hex}"
                        if record.path.exists():
                            os.rename(record.path, trash)
                            moved.append((record.path, trash))
                        conn.execute("DELETE FROM adapters WHERE name = ? AND version = ?", (record.name, record.version))
                    folder = self.store / name
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
            except BaseException:
                for original, trash in moved:  # put the files back; the rows were rolled back
                    original.parent.mkdir(parents=True, exist_ok=True)
                    os.rename(trash, original)
                raise
        for _, trash in moved:
            shutil.rmtree(trash, ignore_errors=True)
        return records

    def pin(self, tag: str, name: str, version: int | None = None) -> AdapterRecord:
        """Point ``tag`` at ``name:version`` (latest version when None) until unpinned; tags that version."""
        check_label(tag, "domain tag")
        with closing(self._connect()) as conn, immediate(conn):
            record = self._get(conn, name, version)
            adapter_id = self._id(conn, record)
            conn.execute("INSERT OR IGNORE INTO adapter_tags (adapter_id, tag) VALUES (?, ?)", (adapter_id, tag))
            conn.execute("INSERT OR REPLACE INTO tag_pins (tag, adapter_id) VALUES (?, ?)", (tag, adapter_id))
            return self._get(conn, record.name, record.version)

    def unpin(self, tag: str) -> AdapterRecord:
        """Let ``tag`` follow the latest version carrying it again; returns where it now points."""
        with closing(self._connect()) as conn:
            with immediate(conn):
                if conn.execute("DELETE FROM tag_pins WHERE tag = ?", (tag,)).rowcount == 0:
                    raise RegistryError(f"tag {tag!r} is not pinned; pinned tags: {_listing(self._pinned(conn))}")
            return self._tag_pointer(conn, tag)

    # -- reading --------------------------------------------------------------
    # ``base_fingerprint`` (keyword) restricts a read to the adapters of one base:
    # a server over one model must never be handed an adapter made for another.

    def list(self, tag: str | None = None, *, base_fingerprint: str | None = None) -> builtins.list[AdapterRecord]:
        """The latest version of each name (of those versions carrying ``tag``, when given), by name."""
        tagged = "" if tag is None else " AND id IN (SELECT adapter_id FROM adapter_tags WHERE tag = :tag)"
        sql = (
            "SELECT a.* FROM adapters a JOIN"
            f" (SELECT name, MAX(version) AS version FROM adapters WHERE {_FOR_BASE}{tagged} GROUP BY name) latest"
            " USING (name, version) ORDER BY a.name"
        )
        with closing(self._connect()) as conn:
            return [self._record(conn, row) for row in conn.execute(sql, {"tag": tag, "fp": base_fingerprint})]

    def versions(self, name: str) -> builtins.list[AdapterRecord]:
        """Every version of ``name``, oldest first."""
        with closing(self._connect()) as conn:
            records = self._versions(conn, name)
            if not records:
                self._get(conn, name)
            return records

    def get(self, name: str, version: int | None = None, *, base_fingerprint: str | None = None) -> AdapterRecord:
        """One version of ``name`` (the latest when ``version`` is None)."""
        with closing(self._connect()) as conn:
            return self._get(conn, name, version, base_fingerprint)

    def resolve(self, name_or_tag: str, *, base_fingerprint: str | None = None) -> AdapterRecord:
        """An adapter name (or ``name:version``) first, else the adapter the domain tag points to."""
        ref_name, version = parse_ref(name_or_tag)
        fp = base_fingerprint
        with closing(self._connect()) as conn:
            if version is not None or self._versions(conn, ref_name, fp):
                return self._get(conn, ref_name, version, fp)
            try:
                return self._tag_pointer(conn, name_or_tag, fp)
            except AdapterNotFound:
                pass
            raise AdapterNotFound(
                f"no adapter or domain tag named {name_or_tag!r}{_for_base(fp)}; adapters: {_listing(self._names(conn, fp))}; "
                f"tags: {_listing(self._tags(conn, fp))}"
            )

    def tag_pointer(self, tag: str, *, base_fingerprint: str | None = None) -> AdapterRecord:
        """The adapter version ``tag`` points to: its pin, else the latest version carrying it."""
        with closing(self._connect()) as conn:
            return self._tag_pointer(conn, tag, base_fingerprint)

    def tags(self, *, base_fingerprint: str | None = None) -> dict[str, tuple[AdapterRecord, bool]]:
        """Every domain tag -> (the version it points to, whether that is a pin)."""
        fp = base_fingerprint
        with closing(self._connect()) as conn:
            pointers = {tag: self._tag_pointer(conn, tag, fp) for tag in self._tags(conn, fp)}
            return {tag: (record, self._is_pin(conn, tag, record)) for tag, record in pointers.items()}

    # -- internals ------------------------------------------------------------

    def _get(self, conn: sqlite3.Connection, name: str, version: int | None = None, fp: str | None = None) -> AdapterRecord:
        params = {"name": name, "version": version, "fp": fp}
        if version is None:
            sql = f"SELECT * FROM adapters WHERE name = :name AND {_FOR_BASE} ORDER BY version DESC LIMIT 1"
        else:
            sql = f"SELECT * FROM adapters WHERE name = :name AND version = :version AND {_FOR_BASE}"
        row = conn.execute(sql, params).fetchone()
        if row is not None:
            return self._record(conn, row)
        have = [r.version for r in self._versions(conn, name, fp)]
        if have:
            raise AdapterNotFound(f"adapter {name!r} has no version {version}{_for_base(fp)}; versions: {', '.join(map(str, have))}")
        raise AdapterNotFound(f"no adapter named {name!r}{_for_base(fp)}; adapters: {_listing(self._names(conn, fp))}")

    def _tag_pointer(self, conn: sqlite3.Connection, tag: str, fp: str | None = None) -> AdapterRecord:
        params = {"tag": tag, "fp": fp}
        row = conn.execute(
            f"SELECT a.* FROM tag_pins p JOIN adapters a ON a.id = p.adapter_id WHERE p.tag = :tag AND {_FOR_BASE}", params
        ).fetchone() or conn.execute(
            "SELECT a.* FROM adapters a JOIN adapter_tags t ON t.adapter_id = a.id"
            f" WHERE t.tag = :tag AND {_FOR_BASE} ORDER BY a.id DESC LIMIT 1",
            params,
        ).fetchone()
        if row is None:
            raise AdapterNotFound(f"no adapter carries domain tag {tag!r}{_for_base(fp)}; tags: {_listing(self._tags(conn, fp))}")
        return self._record(conn, row)

    def _versions(self, conn: sqlite3.Connection, name: str, fp: str | None = None) -> builtins.list[AdapterRecord]:
        sql = f"SELECT * FROM adapters WHERE name = :name AND {_FOR_BASE} ORDER BY version"
        return [self._record(conn, row) for row in conn.execute(sql, {"name": name, "fp": fp}).fetchall()]

    @staticmethod
    def _is_pin(conn: sqlite3.Connection, tag: str, record: AdapterRecord) -> bool:
        row = conn.execute(
            "SELECT 1 FROM tag_pins p JOIN adapters a ON a.id = p.adapter_id WHERE p.tag = ? AND a.name = ? AND a.version = ?",
            (tag, record.name, record.version),
        ).fetchone()
        return row is not None

    def _record(self, conn: sqlite3.Connection, row: sqlite3.Row) -> AdapterRecord:
        tags = [r[0] for r in conn.execute("SELECT tag FROM adapter_tags WHERE adapter_id = ? ORDER BY tag", (row["id"],))]
        return AdapterRecord(
            name=row["name"],
            version=row["version"],
            tags=tags,
            base_model=row["base_model"],
            base_model_id=row["base_model_id"],
            base_fingerprint=row["base_fingerprint"],
            rank=row["rank"],
            alpha=row["alpha"],
            target_modules=json.loads(row["target_modules"]),
            card=json.loads(row["card"]),
            weights_sha256=row["weights_sha256"],
            path=self.root / row["path"],
            created_at=datetime.fromisoformat(row["created_at"]),
        )

    @staticmethod
    def _id(conn: sqlite3.Connection, record: AdapterRecord) -> int:
        row = conn.execute("SELECT id FROM adapters WHERE name = ? AND version = ?", (record.name, record.version)).fetchone()
        return int(row[0])

    @staticmethod
    def _latest_tags(conn: sqlite3.Connection, name: str) -> builtins.list[str]:
        rows = conn.execute(
            "SELECT t.tag FROM adapter_tags t JOIN adapters a ON a.id = t.adapter_id WHERE a.name = ?"
            " AND a.version = (SELECT MAX(version) FROM adapters WHERE name = ?) ORDER BY t.tag",
            (name, name),
        )
        return [r[0] for r in rows]

    @staticmethod
    def _names(conn: sqlite3.Connection, fp: str | None = None) -> builtins.list[str]:
        sql = f"SELECT DISTINCT name FROM adapters WHERE {_FOR_BASE} ORDER BY name"
        return [r[0] for r in conn.execute(sql, {"fp": fp})]

    @staticmethod
    def _tags(conn: sqlite3.Connection, fp: str | None = None) -> builtins.list[str]:
        sql = f"SELECT DISTINCT t.tag FROM adapter_tags t JOIN adapters a ON a.id = t.adapter_id WHERE {_FOR_BASE} ORDER BY t.tag"
        return [r[0] for r in conn.execute(sql, {"fp": fp})]

    @staticmethod
    def _pinned(conn: sqlite3.Connection) -> builtins.list[str]:
        return [r[0] for r in conn.execute("SELECT tag FROM tag_pins ORDER BY tag")]

    @staticmethod
    def _check_case_clash(conn: sqlite3.Connection, name: str) -> None:
        """Names that differ only in case would share a folder on case-insensitive file systems."""
        row = conn.execute("SELECT name FROM adapter_names WHERE lower(name) = lower(?) AND name != ?", (name, name)).fetchone()
        if row is not None:
            raise RegistryError(f"adapter name {name!r} differs only in case from existing adapter {row[0]!r}")

    @staticmethod
    def _next_version(conn: sqlite3.Connection, name: str) -> int:
        """Allocate inside the write transaction: the counter survives removals, so versions are never reused."""
        conn.execute("INSERT OR IGNORE INTO adapter_names (name, last_version) VALUES (?, 0)", (name,))
        conn.execute("UPDATE adapter_names SET last_version = last_version + 1 WHERE name = ?", (name,))
        return int(conn.execute("SELECT last_version FROM adapter_names WHERE name = ?", (name,)).fetchone()[0])

    def _claim(self, target: Path) -> None:
        """Make way for a new version folder. Called under the write lock: a folder already there has no
        row (its writer died between rename and commit), so it is debris."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            debris = self.store / f".trash-{uuid.uuid4().hex}"
            os.rename(target, debris)
            shutil.rmtree(debris, ignore_errors=True)

    def _sweep_staging(self) -> None:
        """Remove staging and trash folders left by processes that died long ago."""
        cutoff = time.time() - STALE_STAGING_S
        for entry in self.store.glob(".*"):
            try:
                if entry.name.startswith((".incoming-", ".trash-")) and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                continue


def _resolve_base(base: str | ResolvedModel) -> ResolvedModel:
    if isinstance(base, ResolvedModel):
        return base
    try:
        return resolve_model(str(base))
    except ModelError as exc:
        raise RegistryError(f"base model: {exc}") from exc


_FOR_BASE = "(:fp IS NULL OR base_fingerprint = :fp)"  # every read's optional base filter


def _for_base(fp: str | None) -> str:
    return f" for base {fp}" if fp else ""


def _listing(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "(none)"


__all__ = [
    "AdapterNotFound",
    "AdapterRecord",
    "AdapterRefused",
    "Registry",
    "RegistryError",
    "parse_ref",
]
