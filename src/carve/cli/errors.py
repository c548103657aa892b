"""The one way a command reports a refusal: a red ``error:`` line on stderr and exit code 2."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: <message>`` and return the Exit to raise (``raise fail(...)``)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)
