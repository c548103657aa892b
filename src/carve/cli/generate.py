"""`carve models` and `carve generate`: the base models Carve knows, and one completion from the engine."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from carve.cli.errors import fail
from carve.engine.models import DEFAULT_MODEL


def models_command(
    path: List[str] = typer.Argument(None, help="Local Hugging Face folders to check as well."),
    cache: Optional[Path] = typer.Option(None, "--cache", envvar="CARVE_MODEL_CACHE", help="Where converted models live."),
) -> None:
    """List the base models Carve knows and whether each is ready."""
    from rich.console import Console
    from rich.table import Table

    from carve.engine.models import model_statuses

    table = Table("model", "kind", "state", "path")
    for status in model_statuses(cache, tuple(path or ())):
        label = status.name + (" (default)" if status.name == DEFAULT_MODEL else "")
        table.add_row(label, status.kind, status.state, status.path)
    Console().print(table)


def generate_command(
    prompt: str = typer.Argument(..., help="What to ask."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Model name or Hugging Face folder."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="A PEFT LoRA adapter folder."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, help="0 decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    stream: bool = typer.Option(True, help="Print tokens as they come."),
) -> None:
    """Generate a completion from a base model, optionally with an adapter."""
    from carve.artifact import AdapterValidationError
    from carve.engine.decoding import EngineError, GenerationRequest, Sampling
    from carve.engine.loading import open_engine
    from carve.engine.models import ModelError
    from carve.engine.text import format_user_prompt

    try:
        engine, _, _ = open_engine(model, [("cli", adapter)] if adapter else [])
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        text = prompt if raw else format_user_prompt(engine.tokenizer, prompt)
        request = GenerationRequest.single(text, "cli" if adapter else None, sampling)
        if stream:
            for event in engine.stream([request]):
                typer.echo(event.delta, nl=False)
            typer.echo()
        else:
            typer.echo(engine.generate([request])[0].text)
    except (ModelError, AdapterValidationError, EngineError) as exc:
        raise fail(str(exc))
