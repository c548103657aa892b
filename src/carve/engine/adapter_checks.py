"""Checks on a PEFT LoRA adapter folder, run before anything loads it.

One piece of code serves the registry (which refuses bad adapters before
storing them) and the engine (which refuses an adapter made for another base
before peft would fail deep inside). Weights are read from safetensors headers
only: no tensor is loaded, and pickled weights are never opened.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from carve.artifact import CONFIG_FILE, WEIGHTS_FILE, AdapterValidationError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterFiles:
    """What the files of a LoRA adapter say about it."""

    path: Path
    config: dict[str, Any]
    base_model: str | None
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # modules that actually carry LoRA weights
    shapes: dict[str, tuple[int, int, int, int]]  # module -> (A rows, A cols, B rows, B cols)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), without loading tensors."""
    try:
        with path.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise AdapterValidationError(f"{path}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100_000_000 or header_len > path.stat().st_size - 8:
                raise AdapterValidationError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(handle.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise AdapterValidationError(f"{path}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    return header


def check_adapter_files(path: Path) -> AdapterFiles:
    """Validate a LoRA adapter folder on its own: formats, config, and config versus weights."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(f"{path}: not an adapter folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterValidationError(
                f"{path}: weights are not safetensors ({', '.join(sorted(pickles))}); pickled weights are never loaded"
            )
        raise AdapterValidationError(f"{path}: missing {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise AdapterValidationError(f"{path}: missing {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{config_path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterValidationError(f"{config_path}: field peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterValidationError(f"{config_path}: field r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)):
        raise AdapterValidationError(f"{config_path}: field lora_alpha must be a number, got {alpha!r}")

    header = read_safetensors_header(weights_path)
    parts: dict[str, dict[str, list[int]]] = {}
    for key, meta in header.items():
        if "lora_magnitude_vector" in key:
            continue  # DoRA magnitudes carry no rank
        match = _LORA_KEY.match(key)
        if not match:
            raise AdapterValidationError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight")
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or len(shape) != 2:
            raise AdapterValidationError(f"{weights_path}: tensor {key!r} has shape {shape!r}, expected 2 dimensions")
        parts.setdefault(match["module"], {})[match["part"]] = shape
    if not parts:
        raise AdapterValidationError(f"{weights_path}: holds no LoRA weights")

    rank_pattern = config.get("rank_pattern") or {}
    shapes: dict[str, tuple[int, int, int, int]] = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise AdapterValidationError(f"{weights_path}: module {module} has no {missing} weight")
        a, b = pair["lora_A"], pair["lora_B"]
        expected_rank = next((r for pat, r in rank_pattern.items() if re.search(pat, module)), rank)
        if a[0] != expected_rank or b[1] != expected_rank:
            raise AdapterValidationError(
                f"{path}: {CONFIG_FILE} says r={expected_rank} but module {module} has lora_A {a} and lora_B {b}"
            )
        if not _targeted(module, config.get("target_modules")):
            raise AdapterValidationError(
                f"{path}: module {module} carries weights but is not in {CONFIG_FILE} target_modules {config.get('target_modules')!r}"
            )
        shapes[module] = (a[0], a[1], b[0], b[1])
    return AdapterFiles(
        path=path,
        config=config,
        base_model=config.get("base_model_name_or_path"),
        rank=rank,
        alpha=float(alpha),
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in shapes})),
        shapes=shapes,
    )


def _targeted(module: str, target_modules: Any) -> bool:
    """Whether peft's target_modules setting (list of suffixes, regex, or 'all-linear') covers a module."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    leaf = module.rsplit(".", 1)[-1]
    return any(module == t or module.endswith("." + t) or leaf == t for t in target_modules)


def check_adapter_fits(info: AdapterFiles, base_shapes: Mapping[str, tuple[int, int]], base_label: str) -> None:
    """Refuse an adapter whose modules are missing from the base or whose shapes do not fit it.

    ``base_shapes`` maps the base model's linear module names to (out_features, in_features).
    """
    for module, (_, a_cols, b_rows, _) in info.shapes.items():
        if module not in base_shapes:
            raise AdapterValidationError(
                f"adapter {info.path} (made for {info.base_model or 'an unknown base'}) targets module {module}, "
                f"which base {base_label} does not have"
            )
        out_features, in_features = base_shapes[module]
        if (a_cols, b_rows) != (in_features, out_features):
            raise AdapterValidationError(
                f"adapter {info.path} (made for {info.base_model or 'an unknown base'}) does not fit base {base_label}: "
                f"module {module} is {in_features}->{out_features} in the base but {a_cols}->{b_rows} in the adapter"
            )


def base_shapes_from_folder(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D weight in a Hugging Face model folder, read from safetensors headers."""
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for key, meta in read_safetensors_header(file).items():
            shape = meta.get("shape") if isinstance(meta, dict) else None
            if key.endswith(".weight") and isinstance(shape, list) and len(shape) == 2:
                shapes[key[: -len(".weight")]] = (shape[0], shape[1])
    return shapes
