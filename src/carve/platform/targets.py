"""What a request's ``model`` may name: the base, an adapter, or a domain tag (the gateway routes with carve.router)."""

from __future__ import annotations

from carve.adapters.registry import AdapterRecord, Registry
from carve.artifact import BASE_MODEL


class UnknownModel(LookupError):
    """No base, adapter or tag has this name; the message lists what is served."""

    def __init__(self, name: str, served: list[str]):
        self.name, self.served = name, served
        super().__init__(f"model {name!r} does not exist; served models: {', '.join(served)}")


def served_models(registry: Registry) -> tuple[list[AdapterRecord], dict[str, AdapterRecord]]:
    """(latest record of each adapter, domain tag -> the record it resolves to); tags shadowed by a name are left out."""
    records = list(registry.list())
    names = {r.name for r in records} | {BASE_MODEL}
    tags = {tag: pointer for tag, (pointer, _pinned) in registry.tags().items() if tag not in names}
    return records, tags


def served_model_names(registry: Registry) -> list[str]:
    """``base``, then every adapter name, then every domain tag."""
    records, tags = served_models(registry)
    return [BASE_MODEL, *(r.name for r in records), *sorted(tags)]
