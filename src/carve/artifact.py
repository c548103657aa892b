"""The adapter contract: what an adapter folder holds, its card, how it is named and referred to.

Every layer that makes, checks, stores, routes or serves adapters reads these
definitions from here and nowhere else:

- the folder: a standard PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) plus Carve's card (``carve-card.json``), the
  texts the router profiles it by (``carve-profile.jsonl``) and a README;
- the card (:class:`AdapterCard`): written whole by carve.specialize, read by
  the registry, the router and the CLI, which also admit a partial card from
  another tool (unknown fields are kept as written);
- names: the rule for adapter names and domain tags (:func:`check_name`), the
  public names that are not adapters (``base``, ``auto``), and the key of an
  adapter version (``name@vN``, :func:`adapter_key`), which caches, merges
  and routing profiles all use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "carve-card.json"
# What the adapter was trained on, for the router (carve.router.profiles): one JSON object per
# line, {"source": "seed"|"synthetic", "instruction", "input"}; stored with every version.
PROFILE_FILE = "carve-profile.jsonl"
README_FILE = "README.md"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, README_FILE, PROFILE_FILE)  # all an adapter folder may bring into the store

BASE_MODEL = "base"  # the base model without an adapter, as a request, a report or the router names it
AUTO_MODEL = "auto"  # let the router choose
RESERVED_NAMES = frozenset({BASE_MODEL, AUTO_MODEL})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterValidationError(ValueError):
    """The adapter cannot be used; the message names the file, field or module at fault."""


def check_name(name: str, what: str = "adapter name") -> str:
    """Names become folder names and URL parts: refuse traversal and control characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AdapterValidationError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
        )
    return name


def adapter_key(name: str, version: int) -> str:
    """The key of one adapter version: a new version is a different key, so it is loaded afresh."""
    return f"{name}@v{version}"


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter version, as engines need it (plain data, picklable across Ray)."""

    name: str
    version: int
    path: str

    @property
    def key(self) -> str:
        return adapter_key(self.name, self.version)

    @classmethod
    def of(cls, record: Any) -> "AdapterRef":
        """From anything with ``name``, ``version`` and ``path`` (a registry record)."""
        return cls(str(record.name), int(record.version), str(record.path))


class CardDomain(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Optional[str] = None
    tag: Optional[str] = None
    description: Optional[str] = None


class AdapterCard(BaseModel):
    """carve-card.json: where an adapter came from, what each stage produced, its settings and evaluation.

    carve.specialize fills every field. The registry relies on ``base_fingerprint``
    (made for which weights) and ``domain.tag`` (the default tag).
    """

    model_config = ConfigDict(extra="allow")

    name: Optional[str] = None
    base_model: Optional[str] = None
    base_model_id: Optional[str] = None
    base_fingerprint: Optional[str] = None
    domain: Optional[CardDomain] = None
    seeds_hash: Optional[str] = None
    seeds_count: Optional[int] = None
    corpus_hash: Optional[str] = None
    counts: Optional[dict[str, Any]] = None
    hyperparameters: Optional[dict[str, Any]] = None
    timings_s: Optional[dict[str, float]] = None
    evaluation: Optional[dict[str, Any]] = None
    created_at: Optional[str] = None
    carve_version: Optional[str] = None
    run_id: Optional[str] = None
