"""Stage 6: the hand-off: a standard PEFT adapter folder plus Carve's card.

The folder is what vLLM, LoRAX or plain peft load (adapter_config.json +
adapter_model.safetensors), with ``base_model_name_or_path`` set to the base
model's id rather than a local path, and ``carve-card.json``: where the
adapter came from (base weights fingerprint, seeds and corpus hashes), what
each stage produced and removed, the hyperparameters, timings and evaluation.
The registry reads the card.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

import carve
from carve.specialize.store import write_atomic

CARD = "carve-card.json"
# What the adapter was trained on, for the router (carve.router.profiles): one JSON object
# per line, {"source": "seed"|"synthetic", "instruction", "input"}. The registry stores it
# with the adapter, so every registered version carries the texts its routing profile is built from.
PROFILE = "carve-profile.jsonl"


class CardDomain(BaseModel):
    name: str
    tag: str
    description: str


class AdapterCard(BaseModel):
    """carve-card.json: the provenance and results of one specialized adapter."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base_model: str
    base_model_id: str
    base_fingerprint: str
    domain: CardDomain
    seeds_hash: str
    seeds_count: int
    corpus_hash: str | None
    counts: dict[str, Any]
    hyperparameters: dict[str, Any]
    timings_s: dict[str, float]
    evaluation: dict[str, Any] | None = None
    created_at: str
    carve_version: str
    run_id: str


def package_adapter(trained: Path, out: Path, card: AdapterCard) -> Path:
    """Copy the trained adapter into ``out`` (replaced atomically) with its card; returns ``out``."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(trained / name, staging / name)
    config = json.loads((staging / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = card.base_model_id
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (staging / CARD).write_text(card.model_dump_json(indent=2))
    readme = (
        f"# {card.name}\n\nA LoRA adapter self-specialized by Carve for the {card.domain.name} domain "
        f"on {card.base_model_id}.\nProvenance, counts and settings: {CARD}.\n"
    )
    (staging / "README.md").write_text(readme)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def write_profile(out: Path, seeds: list[Any], instruction_files: list[Path]) -> Path:
    """Write carve-profile.jsonl into the adapter folder ``out``: the seeds, then the kept synthetic instructions."""
    from carve.specialize.store import read_jsonl, write_jsonl_atomic

    records = [{"source": "seed", "instruction": s.instruction, "input": s.input} for s in seeds]
    for path in instruction_files:
        if path.is_file():
            records += [{"source": "synthetic", "instruction": r["instruction"], "input": r.get("input", "")} for r in read_jsonl(path)]
    write_jsonl_atomic(out / PROFILE, records)
    return out / PROFILE


def update_evaluation(adapter_dir: Path, evaluation: dict[str, Any]) -> None:
    card_path = adapter_dir / CARD
    card = AdapterCard.model_validate_json(card_path.read_text())
    card.evaluation = evaluation
    write_atomic(card_path, card.model_dump_json(indent=2))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def carve_version() -> str:
    return carve.__version__
