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

import carve
from carve.artifact import CARD_FILE, CONFIG_FILE, PROFILE_FILE, README_FILE, WEIGHTS_FILE, AdapterCard
from carve.specialize.store import read_jsonl, write_atomic, write_jsonl_atomic


def package_adapter(trained: Path, out: Path, card: AdapterCard) -> Path:
    """Copy the trained adapter into ``out`` (replaced atomically) with its card; returns ``out``."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(trained / name, staging / name)
    config = json.loads((staging / CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = card.base_model_id
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    (staging / CARD_FILE).write_text(card.model_dump_json(indent=2))
    readme = (
        f"# {card.name}\n\nA LoRA adapter self-specialized by Carve for the {card.domain.name if card.domain else card.name} domain "
        f"on {card.base_model_id}.\nProvenance, counts and settings: {CARD_FILE}.\n"
    )
    (staging / README_FILE).write_text(readme)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def write_profile(out: Path, seeds: list[Any], instruction_files: list[Path]) -> Path:
    """Write carve-profile.jsonl into the adapter folder ``out``: the seeds, then the kept synthetic instructions."""
    records = [{"source": "seed", "instruction": s.instruction, "input": s.input} for s in seeds]
    for path in instruction_files:
        if path.is_file():
            records += [{"source": "synthetic", "instruction": r["instruction"], "input": r.get("input", "")} for r in read_jsonl(path)]
    write_jsonl_atomic(out / PROFILE_FILE, records)
    return out / PROFILE_FILE


def update_evaluation(adapter_dir: Path, evaluation: dict[str, Any]) -> None:
    card_path = adapter_dir / CARD_FILE
    card = AdapterCard.model_validate_json(card_path.read_text())
    card.evaluation = evaluation
    write_atomic(card_path, card.model_dump_json(indent=2))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def carve_version() -> str:
    return carve.__version__
