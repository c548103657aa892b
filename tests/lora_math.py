"""LoRA deltas read back from adapter files, for tests that check merges against the math."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def lora_deltas(adapter_dir: Path) -> dict[str, Any]:
    """dW = scaling * B @ A of every LoRA module in a PEFT adapter folder, by module name (tests and checks)."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return deltas_from_tensors(tensors, float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora", False)))


def deltas_from_tensors(tensors: dict[str, Any], alpha: float, r: int, rslora: bool = False, adapter: Optional[str] = None) -> dict[str, Any]:
    """dW per module from lora_A / lora_B tensors (saved names, or a live model's with ``adapter`` set)."""
    scaling = alpha / (r**0.5 if rslora else r)
    out: dict[str, Any] = {}
    suffix_a = f"lora_A.{adapter}.weight" if adapter else "lora_A.weight"
    for name, a in tensors.items():
        if not name.endswith(suffix_a):
            continue
        module = name[: -len(suffix_a)].rstrip(".")
        b = tensors[name[: -len(suffix_a)] + suffix_a.replace("lora_A", "lora_B")]
        out[module.removeprefix("base_model.model.")] = scaling * (b.float() @ a.float())
    return out
