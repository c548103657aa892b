"""`carve serve`: the OpenAI-compatible server over one base model and the registry's adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from carve.cli.errors import fail
from carve.cli.options import database_option, registry_option
from carve.jobs.settings import JobSettings
from carve.platform.config import ServeConfig


def _option(field: str, *flags: str, **extra: Any) -> Any:
    """A typer option whose default and help are ServeConfig's own for ``field``."""
    info = ServeConfig.model_fields[field]
    return typer.Option(info.default, *flags, help=info.description, **extra)


def serve_command(
    model: str = _option("model", "--model", "-m"),
    address: Optional[str] = typer.Option(None, "--address", help="Deploy onto this existing Ray cluster (e.g. ray://head:10001); default: start a local Ray."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the HTTP server binds."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="HTTP port; 0: any free one (local Ray only), shown once serving."),
    replicas: int = _option("replicas", "--replicas", min=1),
    max_adapters: int = _option("max_adapters", "--max-adapters", min=1),
    registry: Optional[Path] = registry_option("Adapter registry folder (adapter files and job folders; on a cluster, a filesystem every node sees)."),
    database: Optional[str] = database_option(),
    max_tokens_cap: int = _option("max_tokens_cap", "--max-tokens-cap", min=1),
    batching: str = _option("batching", "--batching"),
    max_batch_size: int = _option("max_batch_size", "--max-batch-size", min=1),
    max_step_tokens: int = _option("max_step_tokens", "--max-step-tokens", min=1),
    max_step_ms: Optional[float] = _option("max_step_ms", "--max-step-ms", min=0.001),
    max_waiting: int = _option("max_waiting", "--max-waiting", min=0),
    draft_tokens: int = _option("draft_tokens", "--draft-tokens", min=0, max=16),
    draft_max_rows: int = _option("draft_max_rows", "--draft-max-rows", min=1),
    engine_cpus: float = _option("engine_num_cpus", "--engine-cpus", min=0.0),
    engine_gpus: float = _option("engine_num_gpus", "--engine-gpus", min=0.0),
    engine_nice: int = _option("engine_nice", "--engine-nice", min=0, max=19),
    proxy_location: str = _option("proxy_location", "--proxy-location"),
    job_cpus: float = typer.Option(JobSettings().num_cpus, "--job-cpus", min=0.0, help="CPUs Ray reserves for each specialization job."),
    job_resume_after: float = typer.Option(
        JobSettings().stale_after_s, "--job-resume-after", min=0.1, help="Seconds without a heartbeat after which a job (its node lost) is resumed elsewhere.",
    ),
) -> None:
    """Serve the base model and its adapters over HTTP (OpenAI-compatible) on Ray Serve."""
    from pydantic import ValidationError

    from carve.common.database import DatabaseError
    from carve.platform.launcher import PortTaken, deploy_to_cluster, serve_forever, start_local_server

    try:
        config = ServeConfig.from_env(
            model=model, registry_root=registry, database_url=database, replicas=replicas, max_adapters=max_adapters, max_tokens_cap=max_tokens_cap,
            batching=batching, max_batch_size=max_batch_size, max_step_tokens=max_step_tokens, max_step_ms=max_step_ms, max_waiting=max_waiting, engine_num_cpus=engine_cpus, engine_num_gpus=engine_gpus,
            engine_nice=engine_nice, draft_tokens=draft_tokens, draft_max_rows=draft_max_rows,
            proxy_location=proxy_location, jobs=JobSettings.resuming_after(job_resume_after, num_cpus=job_cpus), default_max_tokens=min(128, max_tokens_cap),
        )
    except ValidationError as exc:
        from carve.common.errors import error_lines

        raise fail("; ".join(error_lines(exc)))
    generated = not config.admin_token
    config = config.with_generated_admin_token()
    if address:
        if port == 0:
            raise fail("--port 0 needs a local Ray: on a cluster every node's proxy must use the same, known port")
        try:
            handle = deploy_to_cluster(address, config, host="0.0.0.0" if host == "127.0.0.1" else host, port=port)
        except DatabaseError as exc:
            raise fail(str(exc))
        _print_warnings(handle.warnings)
        typer.echo(
            f"deployed Carve onto {address}: OpenAI-compatible API at http://<node>:{port}/v1 on the cluster's nodes "
            f"({handle.url}/v1 from the head); it keeps running, remove it with `serve delete carve`"
        )
        _print_tokens(config, generated)
        return
    typer.echo(f"starting a local Ray and Carve ({model}, {replicas} replica(s), {max_adapters} adapters each)...")
    try:
        handle = start_local_server(config=config, host=host, port=port)
    except (DatabaseError, PortTaken) as exc:
        raise fail(str(exc))
    _print_warnings(handle.warnings)
    typer.echo(f"serving on {handle.url}/v1 (OpenAI-compatible); Ctrl-C stops")
    _print_tokens(config, generated)
    serve_forever(handle)
    typer.echo("stopped")


def _print_warnings(warnings: "tuple[str, ...]") -> None:
    for warning in warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


def _print_tokens(config: "object", generated: bool) -> None:
    token = getattr(config, "admin_token")
    if generated:
        typer.echo(f"operator token (CARVE_ADMIN_TOKEN not set, generated for this run): {token}")
    if getattr(config, "api_key"):
        typer.echo("inference needs the API key from CARVE_API_KEY")
