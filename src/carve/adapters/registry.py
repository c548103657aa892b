"""The adapter registry: which LoRA adapters exist, for which base, under which domain tags.

The registry's tables live in the Carve database (carve.common.database: the
SQLite file ``registry.sqlite3`` here by default, PostgreSQL on a cluster);
the adapters' files live in ``store/<name>/v<version>/`` under the registry
folder, on a filesystem every node sees. Adding is all-or-nothing: the
adapter is validated first, copied into a hidden staging folder, fsynced,
then, holding the registry's write lock, given the next version number,
renamed into place and recorded in one transaction. A failure at any step
leaves neither a row nor a folder, and concurrent writers (several processes,
several nodes) queue on the lock, so versions never collide.

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
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection, Row
from sqlalchemy.schema import CreateIndex, CreateTable

from carve.adapters.intake import fsync_dir, inspect_adapter, stage_copy
from carve.artifact import RESERVED_NAMES, AdapterValidationError, check_name
from carve.common.database import Database, Migration, database_url
from carve.common.hashing import sha256_file
from carve.common.paths import registry_dir
from carve.engine.models import (
    DEFAULT_MODEL,
    ModelError,
    ResolvedModel,
    resolve_model,
)

STORE_DIR = "store"
STALE_STAGING_S = 24 * 3600
COMPONENT = "registry"

# The tables as this Carve uses them. Migration 1 creates them as they are now; a later
# migration that changes one must first give migration 1 a frozen copy of its definition.
metadata = sa.MetaData()
adapter_names = sa.Table(  # each name's version counter: versions are never reused
    "adapter_names",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("last_version", sa.Integer, nullable=False),
)
adapters = sa.Table(
    "adapters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, sa.ForeignKey("adapter_names.name"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("base_model_id", sa.Text, nullable=False),
    sa.Column("base_fingerprint", sa.Text, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("alpha", sa.Float, nullable=False),
    sa.Column("target_modules", sa.Text, nullable=False),  # JSON list
    sa.Column("card", sa.Text, nullable=False),  # JSON object
    sa.Column("weights_sha256", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),  # relative to the registry folder
    sa.Column("created_at", sa.Text, nullable=False),  # ISO 8601, UTC
    sa.UniqueConstraint("name", "version"),
    sqlite_autoincrement=True,  # ids are never reused either: a tag's "latest" is the highest id
)
adapter_tags = sa.Table(
    "adapter_tags",
    metadata,
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
)
tags_by_tag = sa.Index("adapter_tags_by_tag", adapter_tags.c.tag)
tag_pins = sa.Table(
    "tag_pins",
    metadata,
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False),
)

MIGRATIONS: list[Migration] = [
    [  # 1: adapters, their tags, tag pins, the version counters
        CreateTable(adapter_names), CreateTable(adapters), CreateTable(adapter_tags), CreateIndex(tags_by_tag), CreateTable(tag_pins),
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
    """Adapters on disk plus their records in the Carve database; safe to share between threads, processes and nodes.

    ``database`` is a database URL (carve.common.database); None means
    CARVE_DATABASE_URL, else the SQLite file in ``root``.
    """

    def __init__(self, root: Path | None = None, database: Optional[str] = None):
        self.root = Path(root).expanduser() if root is not None else registry_dir()
        self.database = Database(database_url(database, self.root))
        self.database.migrate(COMPONENT, MIGRATIONS)
        self.store = self.root / STORE_DIR
        self.store.mkdir(parents=True, exist_ok=True)

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
            try:
                with self.database.write(COMPONENT) as conn:
                    self._check_case_clash(conn, name)
                    if not tag_list:  # a new version keeps serving its predecessor's domains
                        tag_list = self._latest_tags(conn, name)
                    version = self._next_version(conn, name)
                    target = self.store / name / f"v{version}"
                    self._claim(target)
                    os.rename(staging, target)
                    fsync_dir(target.parent)
                    row = {
                        "name": name, "version": version, "base_model": resolved.name, "base_model_id": resolved.model_id,
                        "base_fingerprint": resolved.fingerprint, "rank": intake.files.rank, "alpha": intake.files.alpha,
                        "target_modules": json.dumps(list(intake.files.target_modules)), "card": json.dumps(intake.card, sort_keys=True),
                        "weights_sha256": weights_sha256, "path": target.relative_to(self.root).as_posix(),
                        "created_at": datetime.now(timezone.utc).isoformat(),
                    }
                    self._insert(conn, row, tag_list)
            except BaseException:
                if target is not None and target.exists() and not staging.exists():
                    shutil.rmtree(target, ignore_errors=True)
                raise
            return self.get(name, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str, version: int | None = None) -> builtins.list[AdapterRecord]:
        """Remove one version of ``name``, or all of them; returns what was removed.

        Tags pointing at a removed version fall back to the previous version
        carrying them (pins on it are dropped).
        """
        moved: list[tuple[Path, Path]] = []
        try:
            with self.database.write(COMPONENT) as conn:
                records = [self._get(conn, name, version)] if version is not None else self._versions(conn, name)
                if not records:
                    self._get(conn, name)  # raises AdapterNotFound listing names
                for record in records:
                    trash = self.store / f".trash-{uuid.uuid4().hex}"
                    if record.path.exists():
                        os.rename(record.path, trash)
                        moved.append((record.path, trash))
                    conn.execute(sa.delete(adapters).where(adapters.c.name == record.name, adapters.c.version == record.version))
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
        with self.database.write(COMPONENT) as conn:
            record = self._get(conn, name, version)
            adapter_id = self._id(conn, record)
            carries = sa.select(adapter_tags.c.tag).where(adapter_tags.c.adapter_id == adapter_id, adapter_tags.c.tag == tag)
            if conn.execute(carries).first() is None:
                conn.execute(adapter_tags.insert().values(adapter_id=adapter_id, tag=tag))
            if not conn.execute(sa.update(tag_pins).where(tag_pins.c.tag == tag).values(adapter_id=adapter_id)).rowcount:
                conn.execute(tag_pins.insert().values(tag=tag, adapter_id=adapter_id))
            return self._get(conn, record.name, record.version)

    def unpin(self, tag: str) -> AdapterRecord:
        """Let ``tag`` follow the latest version carrying it again; returns where it now points."""
        with self.database.write(COMPONENT) as conn:
            if conn.execute(sa.delete(tag_pins).where(tag_pins.c.tag == tag)).rowcount == 0:
                raise RegistryError(f"tag {tag!r} is not pinned; pinned tags: {_listing(self._pinned(conn))}")
        with self.database.read() as conn:
            return self._tag_pointer(conn, tag)

    # -- reading --------------------------------------------------------------
    # ``base_fingerprint`` (keyword) restricts a read to the adapters of one base:
    # a server over one model must never be handed an adapter made for another.

    def list(self, tag: str | None = None, *, base_fingerprint: str | None = None) -> builtins.list[AdapterRecord]:
        """The latest version of each name (of those versions carrying ``tag``, when given), by name."""
        latest = sa.select(adapters.c.name, sa.func.max(adapters.c.version).label("version")).where(_for_base(base_fingerprint))
        if tag is not None:
            latest = latest.where(adapters.c.id.in_(sa.select(adapter_tags.c.adapter_id).where(adapter_tags.c.tag == tag)))
        newest = latest.group_by(adapters.c.name).subquery()
        query = (
            sa.select(adapters)
            .join(newest, sa.and_(adapters.c.name == newest.c.name, adapters.c.version == newest.c.version))
            .order_by(adapters.c.name)
        )
        with self.database.read() as conn:
            return [self._record(conn, row) for row in conn.execute(query).all()]

    def versions(self, name: str) -> builtins.list[AdapterRecord]:
        """Every version of ``name``, oldest first."""
        with self.database.read() as conn:
            records = self._versions(conn, name)
            if not records:
                self._get(conn, name)
            return records

    def get(self, name: str, version: int | None = None, *, base_fingerprint: str | None = None) -> AdapterRecord:
        """One version of ``name`` (the latest when ``version`` is None)."""
        with self.database.read() as conn:
            return self._get(conn, name, version, base_fingerprint)

    def resolve(self, name_or_tag: str, *, base_fingerprint: str | None = None) -> AdapterRecord:
        """An adapter name (or ``name:version``) first, else the adapter the domain tag points to."""
        ref_name, version = parse_ref(name_or_tag)
        fp = base_fingerprint
        with self.database.read() as conn:
            if version is not None or self._versions(conn, ref_name, fp):
                return self._get(conn, ref_name, version, fp)
            try:
                return self._tag_pointer(conn, name_or_tag, fp)
            except AdapterNotFound:
                pass
            raise AdapterNotFound(
                f"no adapter or domain tag named {name_or_tag!r}{_base_text(fp)}; adapters: {_listing(self._names(conn, fp))}; "
                f"tags: {_listing(self._tags(conn, fp))}"
            )

    def tag_pointer(self, tag: str, *, base_fingerprint: str | None = None) -> AdapterRecord:
        """The adapter version ``tag`` points to: its pin, else the latest version carrying it."""
        with self.database.read() as conn:
            return self._tag_pointer(conn, tag, base_fingerprint)

    def tags(self, *, base_fingerprint: str | None = None) -> dict[str, tuple[AdapterRecord, bool]]:
        """Every domain tag -> (the version it points to, whether that is a pin)."""
        fp = base_fingerprint
        with self.database.read() as conn:
            pointers = {tag: self._tag_pointer(conn, tag, fp) for tag in self._tags(conn, fp)}
            return {tag: (record, self._is_pin(conn, tag, record)) for tag, record in pointers.items()}

    # -- internals ------------------------------------------------------------

    def _get(self, conn: Connection, name: str, version: int | None = None, fp: str | None = None) -> AdapterRecord:
        query = sa.select(adapters).where(adapters.c.name == name, _for_base(fp))
        if version is None:
            query = query.order_by(adapters.c.version.desc()).limit(1)
        else:
            query = query.where(adapters.c.version == version)
        row = conn.execute(query).first()
        if row is not None:
            return self._record(conn, row)
        have = [r.version for r in self._versions(conn, name, fp)]
        if have:
            raise AdapterNotFound(f"adapter {name!r} has no version {version}{_base_text(fp)}; versions: {', '.join(map(str, have))}")
        raise AdapterNotFound(f"no adapter named {name!r}{_base_text(fp)}; adapters: {_listing(self._names(conn, fp))}")

    def _tag_pointer(self, conn: Connection, tag: str, fp: str | None = None) -> AdapterRecord:
        pinned = sa.select(adapters).join(tag_pins, tag_pins.c.adapter_id == adapters.c.id).where(tag_pins.c.tag == tag, _for_base(fp))
        latest = (
            sa.select(adapters)
            .join(adapter_tags, adapter_tags.c.adapter_id == adapters.c.id)
            .where(adapter_tags.c.tag == tag, _for_base(fp))
            .order_by(adapters.c.id.desc())
            .limit(1)
        )
        row = conn.execute(pinned).first() or conn.execute(latest).first()
        if row is None:
            raise AdapterNotFound(f"no adapter carries domain tag {tag!r}{_base_text(fp)}; tags: {_listing(self._tags(conn, fp))}")
        return self._record(conn, row)

    def _versions(self, conn: Connection, name: str, fp: str | None = None) -> builtins.list[AdapterRecord]:
        query = sa.select(adapters).where(adapters.c.name == name, _for_base(fp)).order_by(adapters.c.version)
        return [self._record(conn, row) for row in conn.execute(query).all()]

    @staticmethod
    def _is_pin(conn: Connection, tag: str, record: AdapterRecord) -> bool:
        query = (
            sa.select(tag_pins.c.tag)
            .join(adapters, adapters.c.id == tag_pins.c.adapter_id)
            .where(tag_pins.c.tag == tag, adapters.c.name == record.name, adapters.c.version == record.version)
        )
        return conn.execute(query).first() is not None

    def _record(self, conn: Connection, row: Row[Any]) -> AdapterRecord:
        data = row._mapping
        tags = conn.execute(sa.select(adapter_tags.c.tag).where(adapter_tags.c.adapter_id == data["id"]).order_by(adapter_tags.c.tag)).scalars()
        return AdapterRecord(
            name=data["name"],
            version=data["version"],
            tags=list(tags),
            base_model=data["base_model"],
            base_model_id=data["base_model_id"],
            base_fingerprint=data["base_fingerprint"],
            rank=data["rank"],
            alpha=data["alpha"],
            target_modules=json.loads(data["target_modules"]),
            card=json.loads(data["card"]),
            weights_sha256=data["weights_sha256"],
            path=self.root / data["path"],
            created_at=datetime.fromisoformat(data["created_at"]),
        )

    @staticmethod
    def _insert(conn: Connection, row: dict[str, Any], tags: Sequence[str]) -> None:
        """Record one new version and its tags (inside add's write transaction)."""
        adapter_id = conn.execute(adapters.insert().values(**row)).inserted_primary_key[0]
        if tags:
            conn.execute(adapter_tags.insert(), [{"adapter_id": adapter_id, "tag": t} for t in tags])

    @staticmethod
    def _id(conn: Connection, record: AdapterRecord) -> int:
        query = sa.select(adapters.c.id).where(adapters.c.name == record.name, adapters.c.version == record.version)
        return int(conn.execute(query).scalar_one())

    @staticmethod
    def _latest_tags(conn: Connection, name: str) -> builtins.list[str]:
        newest = sa.select(sa.func.max(adapters.c.version)).where(adapters.c.name == name).scalar_subquery()
        query = (
            sa.select(adapter_tags.c.tag)
            .join(adapters, adapters.c.id == adapter_tags.c.adapter_id)
            .where(adapters.c.name == name, adapters.c.version == newest)
            .order_by(adapter_tags.c.tag)
        )
        return list(conn.execute(query).scalars())

    @staticmethod
    def _names(conn: Connection, fp: str | None = None) -> builtins.list[str]:
        return list(conn.execute(sa.select(adapters.c.name).distinct().where(_for_base(fp)).order_by(adapters.c.name)).scalars())

    @staticmethod
    def _tags(conn: Connection, fp: str | None = None) -> builtins.list[str]:
        query = (
            sa.select(adapter_tags.c.tag)
            .distinct()
            .join(adapters, adapters.c.id == adapter_tags.c.adapter_id)
            .where(_for_base(fp))
            .order_by(adapter_tags.c.tag)
        )
        return list(conn.execute(query).scalars())

    @staticmethod
    def _pinned(conn: Connection) -> builtins.list[str]:
        return list(conn.execute(sa.select(tag_pins.c.tag).order_by(tag_pins.c.tag)).scalars())

    @staticmethod
    def _check_case_clash(conn: Connection, name: str) -> None:
        """Names that differ only in case would share a folder on case-insensitive file systems."""
        query = sa.select(adapter_names.c.name).where(sa.func.lower(adapter_names.c.name) == name.lower(), adapter_names.c.name != name)
        clash = conn.execute(query).scalar()
        if clash is not None:
            raise RegistryError(f"adapter name {name!r} differs only in case from existing adapter {clash!r}")

    @staticmethod
    def _next_version(conn: Connection, name: str) -> int:
        """Allocate inside the write transaction: the counter survives removals, so versions are never reused."""
        bump = sa.update(adapter_names).where(adapter_names.c.name == name).values(last_version=adapter_names.c.last_version + 1)
        if not conn.execute(bump).rowcount:
            conn.execute(adapter_names.insert().values(name=name, last_version=1))
        return int(conn.execute(sa.select(adapter_names.c.last_version).where(adapter_names.c.name == name)).scalar_one())

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


def _for_base(fp: str | None) -> sa.ColumnElement[bool]:
    """Every read's optional base filter."""
    return sa.true() if fp is None else adapters.c.base_fingerprint == fp


def _base_text(fp: str | None) -> str:
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
