"""Build a ready engine from a model name and adapter folders: the path every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from carve.engine.models import LoadPlan, ResolvedModel, load_base, plan_load, resolve_model


def open_engine(model: str, adapters: Sequence[tuple[str, Path]] = (), precision: str = "auto", quantize: bool | None = None):
    """Resolve, load and wrap a base model in an Engine with the given adapters loaded.

    Returns (engine, resolved model, load plan).
    """
    import torch

    from carve.engine.decoding import Engine

    resolved: ResolvedModel = resolve_model(model)
    plan: LoadPlan = plan_load(torch.cuda.is_available(), precision=precision, quantize=quantize)  # type: ignore[arg-type]
    hf_model, tokenizer = load_base(resolved, plan)
    engine = Engine(hf_model, tokenizer, base_label=f"{resolved.name} ({resolved.model_id})", weight_format=plan.engine_weights)
    for name, path in adapters:
        engine.load_adapter(name, path)
    return engine, resolved, plan

