"""The `carve` command line. Each command imports what it needs when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Carve self-specialized experts out of one base model and serve them.")


def fail(message: str, code: int = 2) -> "typer.Exit":
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@app.command()
def models(
    path: List[str] = typer.Argument(None, help="Local Hugging Face folders to check as well."),
    cache: Optional[Path] = typer.Option(None, "--cache", envvar="CARVE_MODEL_CACHE", help="Where converted models live."),
) -> None:
    """List the base models Carve knows and whether each is ready."""
    from rich.console import Console
    from rich.table import Table

    from carve.platform.models import DEFAULT_MODEL, model_statuses

    table = Table("model", "kind", "state", "path")
    for status in model_statuses(cache, tuple(path or ())):
        label = status.name + (" (default)" if status.name == DEFAULT_MODEL else "")
        table.add_row(label, status.kind, status.state, status.path)
    Console().print(table)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to ask."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Model name or Hugging Face folder."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="A PEFT LoRA adapter folder."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, help="0 decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    stream: bool = typer.Option(True, help="Print tokens as they come."),
) -> None:
    """Generate a completion from a base model, optionally with an adapter."""
    from carve.adapters.validation import AdapterValidationError
    from carve.platform.engine import EngineError, GenerationRequest, Sampling
    from carve.platform.loading import format_user_prompt, open_engine
    from carve.platform.models import ModelError

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


# carve eval (carve.specialize.eval_cli)
from carve.specialize.eval_cli import register as register_eval  # noqa: E402

register_eval(app)


# carve adapters ... (the registry)
from carve.adapters.cli import app as adapters_app  # noqa: E402

app.add_typer(adapters_app, name="adapters")


# carve serve (carve.platform.serve_cli)
from carve.platform.serve_cli import serve_command  # noqa: E402

app.command("serve")(serve_command)


# carve specialize (carve.specialize.specialize_cli)
from carve.specialize.specialize_cli import specialize as specialize_command  # noqa: E402

app.command("specialize")(specialize_command)


# carve submit (carve.submit_cli): specialization jobs, on a server or here
from carve.submit_cli import submit as submit_command  # noqa: E402

app.command("submit")(submit_command)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


# -- carve demo ---------------------------------------------------------------
@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder of the demo's runs: one per settings, resumed when present."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help="Base model name or Hugging Face folder."),
    seeds: Optional[Path] = typer.Option(None, "--seeds", help="Seed set (default: the shipped seeds/biomedical)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus JSONL (default: the shipped PubMed sample)."),
    eval_limit: int = typer.Option(3, "--eval-limit", help="Examples per task in the base-vs-adapter evaluation (0 skips it)."),
    serve: bool = typer.Option(True, help="Register the adapter and query it over HTTP on a local server."),
    registry: Optional[Path] = typer.Option(None, "--registry", envvar="CARVE_REGISTRY", help="Registry folder."),
) -> None:
    """Run the whole job end to end: specialize, evaluate, register, serve and query by domain tag."""
    from carve.adapters.registry import RegistryError
    from carve.demo import run_demo
    from carve.platform.models import ModelError
    from carve.specialize.retrieval import CorpusError
    from carve.specialize.run import RunError
    from carve.specialize.seeds import SeedSetError

    try:
        run_demo(out, model, seeds, corpus, eval_limit, serve, registry)
    except (FileNotFoundError, ModelError, SeedSetError, CorpusError, RunError, RegistryError) as exc:
        raise fail(str(exc))
