"""Build a ready engine from a model name and adapter folders: the path every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from carve.platform.models import LoadPlan, ResolvedModel, load_base, plan_load, resolve_model


def open_engine(model: str, adapters: Sequence[tuple[str, Path]] = (), precision: str = "auto", quantize: bool | None = None):
    """Resolve, load and wrap a base model in an Engine with the given adapters loaded.

    Returns (engine, resolved model, load plan).
    """
    import torch

    from carve.platform.engine import Engine

    resolved: ResolvedModel = resolve_model(model)
    plan: LoadPlan = plan_load(torch.cuda.is_available(), precision=precision, quantize=quantize)  # type: ignore[arg-type]
    hf_model, tokenizer = load_base(resolved, plan)
    engine = Engine(hf_model, tokenizer, base_label=f"{resolved.name} ({resolved.model_id})")
    for name, path in adapters:
        engine.load_adapter(name, path)
    return engine, resolved, plan


def format_user_prompt(tokenizer, text: str, use_chat_template: bool = True) -> str:  # type: ignore[no-untyped-def]
    """Wrap a user's text in the model's chat template when it has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text
