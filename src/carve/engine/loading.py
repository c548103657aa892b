"""Build a ready engine from a model name and adapter folders: the path every command shares."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from carve.engine.models import LoadPlan, ResolvedModel, cpu_has_native_bf16, load_base, plan_load, resolve_model
from carve.engine.runner import unsupported_reason


def open_engine(model: str, adapters: Sequence[tuple[str, Path]] = (), precision: str = "auto", quantize: bool | None = None):
    """Resolve, load and wrap a base model in an Engine with the given adapters loaded.

    Returns (engine, resolved model, load plan). With precision auto, weight
    copies the engine's own forward cannot run (another architecture) give way
    to the model's own weights.
    """
    import torch

    from carve.engine.decoding import Engine

    resolved: ResolvedModel = resolve_model(model)
    plan: LoadPlan = plan_load(torch.cuda.is_available(), precision=precision, quantize=quantize, cpu_bf16=cpu_has_native_bf16())  # type: ignore[arg-type]
    hf_model, tokenizer = load_base(resolved, plan)
    if precision == "auto" and plan.engine_weights != "native" and unsupported_reason(hf_model) is not None:
        plan = replace(plan, engine_weights="native")
    engine = Engine(hf_model, tokenizer, base_label=f"{resolved.name} ({resolved.model_id})", weight_format=plan.engine_weights)
    for name, path in adapters:
        engine.load_adapter(name, path)
    return engine, resolved, plan

