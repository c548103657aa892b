"""Options several commands share, defined once so their flags and help agree."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

REGISTRY_HELP = "Registry folder (default: registry/ under the Carve home)."


def registry_option(help: str = REGISTRY_HELP) -> Optional[Path]:
    """``--registry``: the registry folder (adapter files, run folders, and the default SQLite database)."""
    return typer.Option(None, "--registry", envvar="CARVE_REGISTRY", help=help)


def database_option() -> Optional[str]:
    """``--database``: the database URL of the registry and the jobs."""
    return typer.Option(
        None, "--database", envvar="CARVE_DATABASE_URL", show_default=False,
        help="Database of the registry and jobs: postgresql://USER:PASSWORD@HOST/DB on a cluster, or sqlite:///PATH "
        "(default: registry.sqlite3 in the registry folder).",
    )
