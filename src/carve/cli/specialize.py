"""`carve specialize`: seeds + corpus -> a self-specialized LoRA adapter, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from carve.cli.errors import fail
from carve.common.errors import error_lines
from carve.engine.models import DEFAULT_MODEL


def specialize(
    seeds: Path = typer.Argument(..., help="Seed set folder (domain.json + seeds.jsonl) or its seeds.jsonl."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Unlabelled domain corpus, JSONL of {id, title, text}."),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="Base model name or Hugging Face folder."),
    out: Path = typer.Option(..., "--out", help="Run folder (created; --resume continues it)."),
    profile: str = typer.Option("quick", "--profile", help="quick (CPU, ~20 min) or paper (the paper's settings)."),
    num_instructions: Optional[int] = typer.Option(None, "--num-instructions", help="Instructions to keep (profile default)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Documents per instruction (profile default)."),
    retrieval: Optional[str] = typer.Option(None, "--retrieval", help="marginal (eq. 2), top1, or none."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="1, or 2 for iterative self-specialization."),
    iteration_instructions: Optional[str] = typer.Option(None, "--iteration-instructions", help="iteration 2's instructions: fresh (the paper) or same (iteration 1's)."),
    instances: Optional[str] = typer.Option(None, "--instances", help="generated (the model writes task inputs, the paper) or corpus (corpus sentences are the inputs)."),
    respond_with: Optional[str] = typer.Option(None, "--respond-with", help="base (the paper) or seed_adapter (a LoRA on the seeds writes the responses)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (profile default)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed; every item's seed derives from it."),
    prompt_style: Optional[str] = typer.Option(None, "--prompt-style", help="chat (chat template when the model has one) or raw."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out, skipping finished items."),
    eval_tasks: Optional[Path] = typer.Option(None, "--eval-tasks", help="Evaluate the base, the seeds-only and the final adapter on these tasks at the end, and package the better adapter."),
    eval_shots: List[int] = typer.Option([0], "--eval-shots", help="Seed demonstrations in evaluation prompts (repeatable)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Examples per evaluation task."),
) -> None:
    """Self-specialize a base model on a domain: instructions, retrieval, responses, LoRA, adapter + card."""
    from pydantic import ValidationError

    from carve.engine.models import ModelError
    from carve.evaluation.suite import SuiteError
    from carve.specialize.config import PROFILES, build_config
    from carve.specialize.retrieval import CorpusError
    from carve.specialize.run import RunError, prepare, run_specialization
    from carve.specialize.seeds import SeedSetError

    if profile not in PROFILES:
        raise fail(f"unknown profile {profile!r}: use {' or '.join(PROFILES)}")
    try:
        training = {"epochs": epochs} if epochs is not None else None
        config = build_config(
            profile,  # type: ignore[arg-type]
            num_instructions=num_instructions, top_k=top_k, retrieval=retrieval, iterations=iterations,
            iteration_instructions=iteration_instructions, instances=instances, respond_with=respond_with, seed=seed, prompt_style=prompt_style, base=base, training=training,
        )
    except ValidationError as exc:
        raise fail(f"invalid settings: {'; '.join(error_lines(exc))}")
    try:
        inputs = prepare(config, seeds, corpus, out, resume, eval_tasks)
    except (SeedSetError, CorpusError, ModelError, RunError, SuiteError) as exc:
        raise fail(str(exc))
    options = {"shots": eval_shots, "limit": eval_limit}
    result = run_specialization(inputs, eval_tasks, options)
    print_summary(result, inputs.out)


def print_summary(result: dict[str, Any], out: Path, examples: int = 3) -> None:
    """Counts, the filter table, stage timings and a few generated examples."""
    from rich.console import Console
    from rich.table import Table

    from carve.specialize.run import TRAINING_SET
    from carve.specialize.store import read_jsonl

    console = Console()
    counts = result["counts"]
    stages = Table("stage", "counts", title="self-specialization")
    for name, values in counts.items():
        shown = {k: v for k, v in values.items() if k != "removed"}
        stages.add_row(name, ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    console.print(stages)
    generated = [k for k, v in counts.items() if k.startswith("instructions") and "removed" in v]  # not iteration 1's set reused
    filters = Table("filter", *generated, title="removed by each filter")
    for name in counts[generated[0]]["removed"] if generated else []:
        filters.add_row(name, *[str(counts[k]["removed"][name]) for k in generated])
    console.print(filters)
    timings = Table("stage", "seconds", title="wall time")
    for name, seconds in result["timings_s"].items():
        timings.add_row(name, f"{seconds:.1f}")
    timings.add_row("total", f"{sum(result['timings_s'].values()):.1f}")
    console.print(timings)
    training_set = out / TRAINING_SET
    if training_set.is_file():
        synthetic = [r for r in read_jsonl(training_set) if r["source"] == "synthetic"]
        console.print(f"[bold]{len(synthetic)} generated examples passed every filter[/bold]" + (", the first ones:" if synthetic else ""))
        for record in synthetic[:examples]:
            console.print(f"[bold]Instruction:[/bold] {record['instruction']}")
            if record["input"]:
                console.print(f"[bold]Input:[/bold] {record['input'][:300]}")
            console.print(f"[bold]Response:[/bold] {record['output'][:300]}\n")
    choice = (result.get("evaluation") or {}).get("choice")
    if choice:
        console.print(f"[bold]packaged the {choice['chosen'].replace('_', '-')} adapter[/bold]: {choice['reason']}")
    console.print(f"adapter: {result.get('adapter')}")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
