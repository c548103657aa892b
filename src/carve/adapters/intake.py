"""Checking an incoming adapter against a base model, and staging its files.

The registry admits an adapter only after everything here passed: the folder
is a LoRA adapter in safetensors (pickles are never opened), its config agrees
with its weights, it was made for this base (card fingerprint, else the
config's base_model_name_or_path), and its shapes fit the base. Only the files
a PEFT adapter needs are copied, so nothing else (a stray pickle, a symlink to
elsewhere) ever enters the store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from carve.artifact import ADAPTER_FILES, CARD_FILE, CONFIG_FILE, AdapterCard, AdapterValidationError
from carve.common.errors import error_field
from carve.engine.adapter_checks import AdapterFiles, base_shapes_from_folder, check_adapter_files, check_adapter_fits
from carve.engine.models import ModelError, ResolvedModel, resolve_model

MAX_CARD_BYTES = 1 << 20


@dataclass(frozen=True)
class Intake:
    """An adapter that passed every check, ready to be copied into the store."""

    source: Path
    files: AdapterFiles
    card: dict[str, Any]
    card_tag: str | None


def read_card(folder: Path) -> dict[str, Any] | None:
    """The adapter's carve-card.json as a dict, or None when the folder has none."""
    path = folder / CARD_FILE
    return read_card_file(path) if path.exists() else None


def read_card_file(path: Path) -> dict[str, Any]:
    """A card file as a dict; AdapterValidationError naming the file when it is not a JSON object."""
    if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
        raise AdapterValidationError(f"{path}: expected a JSON file of at most {MAX_CARD_BYTES} bytes")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise AdapterValidationError(f"{path}: expected a JSON object")
    return card


def parse_card(card: dict[str, Any], where: str) -> AdapterCard:
    try:
        json.dumps(card)
        return AdapterCard.model_validate(card)
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        detail = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise AdapterValidationError(f"{where}: {detail}") from exc


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"field {error_field(error)}: {error['msg']}"


def inspect_adapter(source: Path, base: ResolvedModel, card: dict[str, Any] | None = None) -> Intake:
    """Run every check on an adapter folder for ``base``; raise AdapterValidationError on the first failure.

    ``card`` replaces the folder's carve-card.json when given.
    """
    source = Path(source)
    files = check_adapter_files(source)
    where = f"{source / CARD_FILE}" if card is None else "the given card"
    if card is None:
        card = read_card(source)
    view = parse_card(card, where) if card is not None else None
    label = f"{base.name} ({base.model_id}, {base.fingerprint})"

    if view is not None and view.base_fingerprint is not None:
        if view.base_fingerprint != base.fingerprint:
            made_for = view.base_model or view.base_model_id or "another base"
            raise AdapterValidationError(
                f"{source}: adapter made for {made_for} ({view.base_fingerprint}), base is {label} ({where} base_fingerprint)"
            )
    elif files.base_model and not _same_base(files.base_model, base):
        raise AdapterValidationError(
            f"{source}: adapter made for {files.base_model} ({CONFIG_FILE} base_model_name_or_path), base is {label}"
        )
    check_adapter_fits(files, base_shapes_from_folder(base.path), label)
    tag = view.domain.tag if view is not None and view.domain is not None else None
    return Intake(source=source, files=files, card=card or {}, card_tag=tag)


def _same_base(declared: str, base: ResolvedModel) -> bool:
    """Whether a config's base_model_name_or_path designates ``base``: by id, name, path, or same weights."""
    if declared in (base.model_id, base.name, str(base.path)):
        return True
    path = Path(declared).expanduser()
    if not path.is_dir():
        return False
    if path.resolve() == base.path.resolve():
        return True
    try:  # another copy of the same model folder counts as the same base
        return resolve_model(str(path)).fingerprint == base.fingerprint
    except ModelError:
        return False


# ---------------------------------------------------------------------------
# Staging: copy into the store's file system, durably, before anything is visible


def stage_copy(intake: Intake, staging_root: Path, card: dict[str, Any] | None) -> Path:
    """Copy the adapter's files into a fresh hidden folder under ``staging_root`` and fsync them.

    The copy is checked again (the source may change while it is copied) and
    must match what was validated. ``card`` (when given) is written as the
    copy's carve-card.json. Returns the folder; the caller renames it into place.
    """
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=staging_root))
    try:
        for name in ADAPTER_FILES:
            src = intake.source / name
            if name == CARD_FILE and card is not None:
                (staging / name).write_text(json.dumps(card, indent=2, sort_keys=True))
            elif src.is_file():
                shutil.copyfile(src, staging / name)
            else:
                continue
            fsync_file(staging / name)
        fsync_dir(staging)
        copied = check_adapter_files(staging)
        if (copied.rank, copied.alpha, copied.shapes) != (intake.files.rank, intake.files.alpha, intake.files.shapes):
            raise AdapterValidationError(f"{intake.source}: the adapter changed while it was being copied; try again")
        return staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
