"""`carve adapters ...`: add, list, show, remove and tag adapters in the registry."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from carve.cli.errors import fail
from carve.cli.options import database_option, registry_option
from carve.engine.models import DEFAULT_MODEL

if TYPE_CHECKING:  # pragma: no cover
    from carve.adapters.registry import AdapterRecord, Registry

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Store, version and tag LoRA adapters (the registry).")

RegistryDir = registry_option()
DatabaseUrl = database_option()
AsJson = typer.Option(False, "--json", help="Print JSON instead of a table.")


@contextmanager
def _registry(root: Optional[Path], database: Optional[str]) -> Iterator["Registry"]:
    """Open the registry and turn every refusal into a red error line and exit code 2."""
    from carve.adapters.registry import Registry, RegistryError
    from carve.artifact import AdapterValidationError
    from carve.common.database import DatabaseError

    try:
        yield Registry(root, database)
    except (RegistryError, AdapterValidationError, DatabaseError) as exc:
        raise fail(str(exc))


def _ref(text: str) -> tuple[str, Optional[int]]:
    from carve.adapters.registry import RegistryError, parse_ref

    try:
        return parse_ref(text)
    except RegistryError as exc:
        raise fail(str(exc))


def _base_fingerprint(base: str) -> str:
    from carve.adapters.registry import RegistryError
    from carve.engine.models import ModelError, resolve_model

    try:
        return resolve_model(base).fingerprint
    except ModelError as exc:
        raise RegistryError(f"base model: {exc}") from exc


def _echo_json(records: "list[AdapterRecord]") -> None:
    typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))


def _table(records: "list[AdapterRecord]", pointers: dict[str, tuple["AdapterRecord", bool]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "version", "tags", "base", "rank", "alpha", "modules", "created")
    for r in records:
        marked = [t + ("*" if t in pointers and pointers[t][0].ref == r.ref else "") for t in r.tags]
        table.add_row(
            r.name, str(r.version), " ".join(marked), r.base_model or r.base_model_id, str(r.rank), f"{r.alpha:g}",
            ",".join(r.target_modules), r.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)
    if any(pointers):
        typer.echo("* the version this domain tag points to")


@app.command()
def add(
    path: Path = typer.Argument(..., help="A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."),
    name: str = typer.Option(..., "--name", "-n", help="Adapter name; adding an existing name makes a new version."),
    tag: List[str] = typer.Option([], "--tag", "-t", help="Domain tag (repeatable); default: the card's domain tag."),
    base: str = typer.Option(DEFAULT_MODEL, "--base", "-b", help="Base model name or Hugging Face folder."),
    card: Optional[Path] = typer.Option(None, "--card", help="A carve-card.json to use instead of the folder's own."),
    registry: Optional[Path] = RegistryDir,
    database: Optional[str] = DatabaseUrl,
) -> None:
    """Validate an adapter against its base and store it as the next version of NAME."""
    with _registry(registry, database) as reg:
        from carve.adapters.intake import read_card_file

        card_data = read_card_file(card) if card is not None else None
        record = reg.add(path, name, tag, base=base, card=card_data)
    tags = f" [{', '.join(record.tags)}]" if record.tags else ""
    typer.echo(f"added {record.ref}{tags} for {record.base_model} -> {record.path}")


@app.command("list")
def list_(
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="Only adapters carrying this domain tag."),
    all_versions: bool = typer.Option(False, "--all", "-a", help="Every version, not only the latest of each name."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Only adapters made for this base model (name or folder)."),
    as_json: bool = AsJson,
    registry: Optional[Path] = RegistryDir,
    database: Optional[str] = DatabaseUrl,
) -> None:
    """List adapters: the latest version of each name."""
    with _registry(registry, database) as reg:
        fp = _base_fingerprint(base) if base else None
        records = reg.list(tag, base_fingerprint=fp)
        if all_versions:
            records = [
                v for r in records for v in reg.versions(r.name)
                if (tag is None or tag in v.tags) and fp in (None, v.base_fingerprint)
            ]
        pointers = reg.tags(base_fingerprint=fp)
    if as_json:
        _echo_json(records)
    elif not records:
        typer.echo(f"no adapters{f' with tag {tag!r}' if tag else ''} in {reg.root}")
    else:
        _table(records, pointers)


@app.command()
def show(
    ref: str = typer.Argument(..., metavar="NAME[:VERSION]", help="Adapter name (latest version), NAME:VERSION, or a domain tag."),
    as_json: bool = AsJson,
    registry: Optional[Path] = RegistryDir,
    database: Optional[str] = DatabaseUrl,
) -> None:
    """Show one adapter version and its card."""
    _ref(ref)
    with _registry(registry, database) as reg:
        record = reg.resolve(ref)
        versions = [v.version for v in reg.versions(record.name)]
    if as_json:
        typer.echo(record.model_dump_json(indent=2))
        return
    from rich.console import Console
    from rich.json import JSON

    console = Console()
    fields = {
        "adapter": record.ref,
        "versions": ", ".join(map(str, versions)),
        "tags": ", ".join(record.tags) or "-",
        "base": f"{record.base_model} ({record.base_model_id})",
        "base fingerprint": record.base_fingerprint,
        "rank / alpha": f"{record.rank} / {record.alpha:g}",
        "target modules": ", ".join(record.target_modules),
        "weights": record.weights_sha256,
        "path": str(record.path),
        "created": record.created_at.isoformat(timespec="seconds"),
    }
    for key, value in fields.items():
        console.print(f"[bold]{key:>17}[/bold]  {value}", highlight=False, soft_wrap=True)
    console.print("[bold]             card[/bold]")
    console.print(JSON(json.dumps(record.card)) if record.card else "  (no card)", soft_wrap=True)


@app.command()
def remove(
    ref: str = typer.Argument(..., metavar="NAME[:VERSION]", help="Adapter name (every version) or NAME:VERSION."),
    registry: Optional[Path] = RegistryDir,
    database: Optional[str] = DatabaseUrl,
) -> None:
    """Remove one version of an adapter, or all its versions."""
    name, version = _ref(ref)
    with _registry(registry, database) as reg:
        removed = reg.remove(name, version)
    typer.echo(f"removed {', '.join(r.ref for r in removed)}")


@app.command()
def tags(
    as_json: bool = AsJson,
    registry: Optional[Path] = RegistryDir,
    database: Optional[str] = DatabaseUrl,
) -> None:
    """Which adapter version each domain tag points to."""
    with _registry(registry, database) as reg:
        pointers = reg.tags()
    if as_json:
        typer.echo(json.dumps({t: {"adapter": r.ref, "pinned": p} for t, (r, p) in pointers.items()}, indent=2))
        return
    if not pointers:
        typer.echo("no domain tags")
    for tag_name, (record, pinned) in pointers.items():
        typer.echo(f"{tag_name} -> {record.ref}{' (pinned)' if pinned else ''}")


@app.command()
def tag(
    tag_name: str = typer.Argument(..., metavar="TAG", help="Domain tag."),
    ref: Optional[str] = typer.Argument(None, metavar="NAME[:VERSION]", help="Pin the tag to this version (latest if no version)."),
    unpin: bool = typer.Option(False, "--unpin", help="Let the tag follow the latest version carrying it again."),
    registry: Optional[Path] = RegistryDir,
    database: Optional[str] = DatabaseUrl,
) -> None:
    """Pin a domain tag to an adapter version, or unpin it."""
    if (ref is None) == (not unpin):
        raise fail("give either NAME[:VERSION] to pin the tag, or --unpin")
    with _registry(registry, database) as reg:
        if unpin:
            record = reg.unpin(tag_name)
            typer.echo(f"{tag_name} -> {record.ref} (follows the latest version)")
        else:
            name, version = _ref(ref or "")
            record = reg.pin(tag_name, name, version)
            typer.echo(f"{tag_name} -> {record.ref} (pinned)")
