"""What a request's ``model`` names: the base, an adapter, or a domain tag.

The gateway routes requests with carve.router (which also handles ``auto`` and
mixtures); :func:`resolve_target` is the plain name/tag lookup for callers
without a router, and :func:`served_model_names` lists what an unknown name could have been.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASE_MODEL_NAME = "base"


class UnknownModel(LookupError):
    """No base, adapter or tag has this name; the message lists what is served."""

    def __init__(self, name: str, served: list[str]):
        self.name, self.served = name, served
        super().__init__(f"model {name!r} does not exist; served models: {', '.join(served)}")


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter version, as the engine replicas need it (plain data, picklable)."""

    name: str
    version: int
    path: str

    @property
    def key(self) -> str:
        """Cache key: a new version of an adapter is a different key, so it is loaded afresh."""
        return f"{self.name}@v{self.version}"

    @classmethod
    def of(cls, record: Any) -> "AdapterRef":
        return cls(str(record.name), int(record.version), str(record.path))


def resolve_target(model: str, registry: Any) -> AdapterRef | None:
    """``base`` -> None; an adapter name, then a domain tag -> that adapter; else UnknownModel."""
    if model == BASE_MODEL_NAME:
        return None
    from carve.adapters.registry import RegistryError

    try:
        return AdapterRef.of(registry.resolve(model))
    except RegistryError:  # not found, or not even a well-formed name
        raise UnknownModel(model, served_model_names(registry)) from None


def served_models(registry: Any) -> tuple[list[Any], dict[str, Any]]:
    """(latest record of each adapter, domain tag -> the record it resolves to); tags shadowed by a name are left out."""
    records = list(registry.list())
    names = {r.name for r in records} | {BASE_MODEL_NAME}
    tags = {tag: pointer for tag, (pointer, _pinned) in registry.tags().items() if tag not in names}
    return records, tags


def served_model_names(registry: Any) -> list[str]:
    """``base``, then every adapter name, then every domain tag."""
    records, tags = served_models(registry)
    return [BASE_MODEL_NAME, *(r.name for r in records), *sorted(tags)]
