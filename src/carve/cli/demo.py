"""`carve demo`: the whole job end to end on the embedded defaults.

Base model (converted from its PyPI package) -> self-specialization of the
shipped biomedical seeds on the shipped PubMed sample (quick profile) with a
small base-vs-adapter evaluation -> the adapter registered under its domain tag
-> a local Ray Serve server queried over HTTP by that tag, beside the base model.
A killed demo resumes where it stopped: the run folder is resumable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from carve.cli.errors import fail
from carve.engine.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from carve.specialize.config import RunConfig

QUESTIONS = [
    (
        "Identify every disease mentioned in the text and list them separated by commas.",
        "The child was admitted with bacterial meningitis and later developed epilepsy and mild hearing loss.",
    ),
    (
        "Answer the biomedical question with yes or no.",
        "Is metformin a first-line treatment for type 2 diabetes?",
    ),
    (
        "Name the gene or protein discussed in the sentence.",
        "Mutations in BRCA1 markedly increase the lifetime risk of breast and ovarian cancer.",
    ),
]


def project_root() -> Path:
    """The clone this package runs from (seeds/ and data/ are shipped there, not in the wheel)."""
    return Path(__file__).resolve().parents[3]


def settings_folder(out: Path, config: "RunConfig", seeds: Path, corpus: Path) -> Path:
    """The demo's run folder for these settings and inputs, under ``out``.

    A killed demo resumes in it; after an upgrade that changes the quick profile
    or the shipped seeds, the demo starts a new folder beside the old one instead
    of refusing to resume it (``carve specialize --resume`` refuses a resume with
    other settings, rightly: it would mix two runs).
    """
    from carve.common.hashing import sha256_file

    files = sorted(p for p in Path(seeds).rglob("*") if p.is_file()) + [Path(corpus)]
    digest = hashlib.sha256(config.model_dump_json().encode())
    for path in files:
        digest.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return out / f"{config.profile}-{digest.hexdigest()[:10]}"


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder of the demo's runs: one per settings, resumed when present."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Base model name or Hugging Face folder."),
    seeds: Optional[Path] = typer.Option(None, "--seeds", help="Seed set (default: the shipped seeds/biomedical)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus JSONL (default: the shipped PubMed sample)."),
    eval_limit: int = typer.Option(3, "--eval-limit", help="Examples per task in the base-vs-adapter evaluation (0 skips it)."),
    serve: bool = typer.Option(True, help="Register the adapter and query it over HTTP on a local server."),
    registry: Optional[Path] = typer.Option(None, "--registry", envvar="CARVE_REGISTRY", help="Registry folder."),
) -> None:
    """Run the whole job end to end: specialize, evaluate, register, serve and query by domain tag."""
    from carve.adapters.registry import RegistryError
    from carve.common.database import DatabaseError
    from carve.engine.models import ModelError
    from carve.specialize.retrieval import CorpusError
    from carve.specialize.run import RunError
    from carve.specialize.seeds import SeedSetError

    try:
        run_demo(out, model, seeds, corpus, eval_limit, serve, registry)
    except (FileNotFoundError, ModelError, SeedSetError, CorpusError, RunError, RegistryError, DatabaseError) as exc:
        raise fail(str(exc))


def run_demo(
    out: Path,
    model: str,
    seeds: Path | None = None,
    corpus: Path | None = None,
    eval_limit: int = 3,
    serve: bool = True,
    registry_root: Path | None = None,
) -> None:
    from carve.cli.specialize import print_summary
    from carve.specialize.config import build_config
    from carve.specialize.run import prepare, run_specialization

    console = Console()
    root = project_root()
    seeds = seeds or root / "seeds" / "biomedical"
    corpus = corpus or root / "data" / "corpus" / "pubmed_sample.jsonl"
    eval_tasks = root / "data" / "eval" / "biomed" if eval_limit > 0 else None
    for needed in (seeds, corpus):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: run the demo from a clone of the repository, or pass --seeds/--corpus")

    console.print(Rule("[bold]1/3 self-specialization[/bold] (quick profile)"))
    config = build_config("quick", base=model)
    out = settings_folder(out, config, seeds, corpus)
    console.print(f"seeds {seeds}\ncorpus {corpus}\nbase {model}\nrun folder {out} (a killed demo resumes here)")
    inputs = prepare(config, seeds, corpus, out, resume=out.exists())
    result = run_specialization(inputs, eval_tasks, {"shots": [0], "limit": eval_limit})
    print_summary(result, out)
    adapter = Path(result["adapter"])

    console.print(Rule("[bold]2/3 registry[/bold]"))
    from carve.adapters.registry import Registry

    registry = Registry(registry_root)
    tag = inputs.seed_set.domain.tag
    record = registry.add(adapter, name=f"{tag}-demo", tags=[tag], base=inputs.base)
    console.print(f"registered {record.name} v{record.version} under tag '{tag}' in {registry.root}")

    if not serve:
        return
    console.print(Rule("[bold]3/3 serving[/bold] (local Ray Serve, OpenAI-compatible HTTP)"))
    _serve_and_ask(console, model, registry.root, tag)


def _serve_and_ask(console: Console, model: str, registry_root: Path, tag: str) -> None:
    import httpx

    from carve.engine.templates import alpaca_prompt
    from carve.platform.launcher import start_local_server, stop_local_server

    console.print("starting the server on a free port of 127.0.0.1 ...")
    handle = start_local_server(model, registry_root, port=0, max_adapters=4)
    console.print(f"server up at {handle.url}")
    try:
        with httpx.Client(base_url=handle.url, timeout=300) as client:
            models = client.get("/v1/models").json()
            console.print("served models: " + ", ".join(m["id"] for m in models["data"]))
            table = Table("question", f"model='{tag}' (adapter)", "model='base'", show_lines=True, title="the same question, by domain tag and to the base")
            for instruction, text in QUESTIONS:
                prompt = alpaca_prompt(instruction, text)
                answers = [_complete(client, name, prompt) for name in (tag, "base")]
                table.add_row(f"{instruction}\n[dim]{text}[/dim]", *answers)
            console.print(table)
    finally:
        stop_local_server()
        console.print("server stopped")


def _complete(client: Any, model: str, prompt: str) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0, "stop": ["\n###"]})
    response.raise_for_status()
    body = response.json()
    reason = (body.get("carve") or {}).get("reason")
    note = f"\n[dim]({reason})[/dim]" if reason else ""
    return body["choices"][0]["text"].strip() + note
