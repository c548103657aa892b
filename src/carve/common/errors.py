"""How a pydantic validation error is told to a person: the field's dotted path and pydantic's message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import ValidationError


def error_field(error: Mapping[str, Any], prefix: Sequence[str] = (), empty: str = "(object)") -> str:
    """``messages.0.role`` for one of ``ValidationError.errors()``; ``empty`` when it is about the whole object."""
    return ".".join([*prefix, *(str(part) for part in error["loc"])]) or empty


def error_lines(exc: "ValidationError", prefix: Sequence[str] = (), empty: str = "body") -> list[str]:
    """One ``<field>: <message>`` line per problem."""
    return [f"{error_field(e, prefix, empty)}: {e['msg']}" for e in exc.errors()]
