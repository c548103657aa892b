"""`carve eval`: score a base model and its adapters side by side on task suites."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from carve.cli.errors import fail
from carve.engine.models import DEFAULT_MODEL
from carve.evaluation.run import BASE_LABEL, DEFAULT_MAX_CONTEXT, EvalError

# --shots takes several numbers after one flag (`--shots 0 1 5`); click options take one
# value each, so the numbers after the first arrive as extra arguments and are checked here.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def parse_shots(values: List[str], extra: List[str]) -> list[int]:
    """Shots from `--shots 0 1 5`, `--shots 0,1,5` or repeated `--shots`; anything else is refused."""
    shots: list[int] = []
    for token in [*values, *extra]:
        for part in token.split(","):
            if not part.strip():
                continue
            try:
                k = int(part)
            except ValueError:
                raise EvalError(f"unexpected argument {token!r} (--shots takes numbers; repeat --adapter for several adapters)") from None
            if k < 0:
                raise EvalError(f"--shots: {k} is negative")
            if k not in shots:
                shots.append(k)
    if not shots:
        raise EvalError("--shots: give at least one k, e.g. --shots 0 1 5")
    return shots


def resolve_adapter(spec: str) -> tuple[str, Path]:
    """(label, folder) for a PEFT folder path or a registered adapter name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name, path
    try:
        from carve.adapters.registry import Registry  # type: ignore[import-not-found]
    except ImportError:
        raise EvalError(f"--adapter {spec}: no such adapter folder (adapter names need the registry, which is not installed)") from None
    from carve.common.database import DatabaseError

    try:
        record = Registry().resolve(spec)  # NAME, NAME:VERSION or a domain tag
    except (ValueError, DatabaseError) as exc:  # the registry's errors are ValueErrors naming what exists
        raise EvalError(f"--adapter {spec}: not a folder, and {exc}") from exc
    return record.name, Path(record.path)


def unique_labels(specs: List[str]) -> list[tuple[str, Path]]:
    """Adapters with distinct labels: 'base' is taken, repeated folder names get -2, -3 ..."""
    taken = {BASE_LABEL}
    out = []
    for spec in specs:
        label, path = resolve_adapter(spec)
        candidate, n = label, 2
        while candidate in taken:
            candidate, n = f"{label}-{n}", n + 1
        taken.add(candidate)
        out.append((candidate, path))
    return out


def eval_command(
    ctx: typer.Context,
    base: str = typer.Option(DEFAULT_MODEL, "--base", "-m", help="Base model name or Hugging Face folder."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", "-a", help="A PEFT adapter folder or registered name; repeat for several."),
    tasks: Path = typer.Option(..., "--tasks", help="Folder of task JSONL files (id, task, instruction, input, output, answers)."),
    shots: List[str] = typer.Option(["0"], "--shots", help="Demonstrations per prompt, e.g. --shots 0 1 5."),
    demos: Optional[Path] = typer.Option(None, "--demos", help="Seed set whose seeds are the demonstrations (needed for k > 0)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N examples of each task."),
    out: Path = typer.Option(..., "--out", help="Folder for results.json, predictions.jsonl, report.md, chart.png; an interrupted run there is resumed."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per batch (each decoded by every model)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Upper bound of new tokens per answer."),
    max_context: int = typer.Option(DEFAULT_MAX_CONTEXT, "--max-context", help="Cap on prompt + answer tokens."),
    against: Optional[List[str]] = typer.Option(
        None, "--against", help="Also pair every adapter against this one (its label: the folder name), e.g. the seeds-only adapter; repeatable."
    ),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or int8 (CPU: decoding on bf16 or int8 copies of the base weights)."),
) -> None:
    """Evaluate a base model and its adapters with the paper's protocol (token F1, ROUGE-L, k-shot)."""
    from rich.console import Console

    from carve.artifact import AdapterValidationError
    from carve.engine.decoding import EngineError
    from carve.engine.models import ModelError
    from carve.evaluation.prompts import PromptError
    from carve.evaluation.report import rich_tables
    from carve.evaluation.suite import SuiteError, load_suite
    from carve.specialize.seeds import SeedSetError, load_seed_set

    console = Console()
    try:
        k_values = parse_shots(shots, list(ctx.args))
        load_suite(tasks)  # a bad suite fails here, before the model loads
        seed_set = load_seed_set(demos) if demos is not None else None
        adapters = unique_labels(list(adapter or []))
        from carve.engine.loading import open_engine
        from carve.engine.models import fingerprint_weights
        from carve.evaluation.run import evaluate_models

        engine, resolved, _ = open_engine(base, adapters, precision)
        models: dict[str, str | None] = {BASE_LABEL: None, **{label: label for label, _ in adapters}}
        identities = {BASE_LABEL: resolved.fingerprint, **{label: f"{resolved.fingerprint}+{fingerprint_weights(path)}" for label, path in adapters}}
        report = evaluate_models(engine, models, tasks, k_values, seed_set, limit, out, max_new_tokens, batch_size, max_context, identities, list(against or []))
    except (EvalError, SuiteError, PromptError, SeedSetError, ModelError, AdapterValidationError, EngineError) as exc:
        raise fail(str(exc))
    for table in rich_tables(report):
        console.print(table)
    console.print(f"{report.generations} answers in {report.wall_time_s:.0f} s; written to {out}/ (results.json, predictions.jsonl, report.md, chart.png)")
