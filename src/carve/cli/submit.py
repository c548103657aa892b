"""`carve submit`: hand a seed set to Carve as a specialization job, on a server or right here.

With ``--server URL`` the job goes to that server's ``POST /v1/specializations``
(the contract is carve.jobs.api) and, with ``--wait``, its progress is followed
until it ends. Without a server the same job runs in this process against the
local registry, with the same validation, job record and registration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from carve.cli.errors import fail
from carve.cli.options import database_option, registry_option
from carve.engine.models import DEFAULT_MODEL

FINISHED = ("succeeded", "failed", "cancelled")


def submit(
    seeds: Path = typer.Argument(..., help="A seeds.jsonl, or a seed-set folder (domain.json + seeds.jsonl)."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Domain tag the adapter is registered under (default: domain.json's)."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Unlabelled domain corpus (JSONL of {id, title, text}), sent with the job."),
    server_corpus: Optional[str] = typer.Option(None, "--server-corpus", help="A corpus file already on the server (its path there)."),
    profile: str = typer.Option("quick", "--profile", help="quick or paper."),
    name: Optional[str] = typer.Option(None, "--domain-name", help="The phrase prompts insert ('biomedical'); default: domain.json's, else the tag."),
    description: Optional[str] = typer.Option(None, "--description", help="One line about the domain."),
    settings: List[str] = typer.Option([], "--set", help="Override a profile setting: KEY=VALUE (JSON value), e.g. num_instructions=200, training.epochs=1."),
    eval_tasks: Optional[Path] = typer.Option(
        None, "--eval-tasks", help="Evaluation tasks (a JSONL file or a folder of them), sent with the job: the better of the seeds-only and the self-specialized adapter is registered."
    ),
    eval_shots: List[int] = typer.Option([0], "--eval-shots", help="Demonstrations per evaluation prompt (repeatable)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="First N examples of each evaluation task."),
    server: Optional[str] = typer.Option(None, "--server", help="Carve server URL; without it the job runs here."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CARVE_API_KEY", help="Bearer token for the server."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job until it ends (server mode)."),
    registry: Optional[Path] = registry_option("Local mode: registry folder."),
    database: Optional[str] = database_option(),
    base: str = typer.Option(DEFAULT_MODEL, "--base", help="Local mode: base model name or folder."),
) -> None:
    """Submit a seed set as a specialization job (a self-specialized adapter registered under its tag)."""

    try:
        body = build_request(seeds, tag, corpus, server_corpus, profile, name, description, settings)
        if eval_tasks is not None:
            body["evaluation"] = {"jsonl": read_tasks(eval_tasks), "shots": eval_shots, "limit": eval_limit}
    except ValueError as exc:
        raise fail(str(exc))
    if server:
        code = _submit_remote(server.rstrip("/"), body, token, wait)
    else:
        code = _submit_local(body, registry, base, database)
    if code:
        raise typer.Exit(code)


def build_request(
    seeds: Path, tag: Optional[str], corpus: Optional[Path], server_corpus: Optional[str], profile: str,
    name: Optional[str], description: Optional[str], settings: List[str],
) -> dict[str, Any]:
    """The POST body (carve.jobs.api.SpecializationRequest) from the command's arguments; ValueError naming what is wrong."""
    seeds = Path(seeds)
    seeds_file = seeds / "seeds.jsonl" if seeds.is_dir() else seeds
    if not seeds_file.is_file():
        raise ValueError(f"{seeds_file}: no such file (give a seeds.jsonl or a folder holding one)")
    domain: dict[str, Any] = {}
    domain_file = seeds_file.parent / "domain.json"
    if domain_file.is_file():
        try:
            domain = json.loads(domain_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{domain_file} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    tag = tag or domain.get("tag")
    if not tag:
        raise ValueError("give --tag (no domain.json with a tag next to the seeds)")
    if corpus is not None and server_corpus is not None:
        raise ValueError("give --corpus (a local file, sent) or --server-corpus (a path on the server), not both")
    body: dict[str, Any] = {
        "tag": tag,
        "seeds": seeds_file.read_text(encoding="utf-8"),
        "domain": {"name": name or domain.get("name"), "description": description or domain.get("description")},
        "profile": profile,
        "settings": parse_settings(settings),
    }
    if corpus is not None:
        if not corpus.is_file():
            raise ValueError(f"{corpus}: no such corpus file")
        body["corpus"] = {"jsonl": corpus.read_text(encoding="utf-8")}
    elif server_corpus is not None:
        body["corpus"] = {"path": server_corpus}
    return body


def read_tasks(path: Path) -> str:
    """The text of a task file, or of every ``*.jsonl`` of a folder joined (each line names its task)."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"--eval-tasks {path}: no such file, or a folder without .jsonl task files")
    texts = [f.read_text(encoding="utf-8") for f in files]
    return "".join(t if t.endswith("\n") or not t else t + "\n" for t in texts)


def parse_settings(pairs: List[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (dotted keys nest, values parsed as JSON when they are JSON) into a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {pair!r}: {part} is not a group of settings")
        node[leaf] = value
    return out


def _show(job: dict[str, Any]) -> str:
    detail = f" ({job['detail']})" if job.get("detail") else ""
    return f"{job['id']} {job['status']}: {job['stage']}{detail} {100 * job['progress']:.0f}%"


def _print_rejection(error: dict[str, Any]) -> None:
    typer.secho(f"error: {error.get('message')}", fg=typer.colors.RED, err=True)
    for problem in error.get("problems") or []:
        typer.echo(f"  - {problem}", err=True)


def _submit_remote(server: str, body: dict[str, Any], token: Optional[str], wait: bool, poll_s: float = 2.0) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=server, headers=headers, timeout=60.0) as client:
        try:
            response = client.post("/v1/specializations", json=body)
        except httpx.HTTPError as exc:
            typer.secho(f"error: cannot reach {server}: {exc}", fg=typer.colors.RED, err=True)
            return 1
        if response.status_code != 202:
            _print_rejection(_error_of(response))
            return 2
        job = response.json()
        typer.echo(f"submitted {job['id']} (tag {job['tag']}); follow it: GET {server}/v1/specializations/{job['id']}")
        last = ""
        while wait and job["status"] not in FINISHED:
            time.sleep(poll_s)
            response = client.get(f"/v1/specializations/{job['id']}")
            if response.status_code != 200:
                _print_rejection(_error_of(response))
                return 1
            job = response.json()
            if _show(job) != last:
                last = _show(job)
                typer.echo(last)
    return _report(job) if wait else 0


def _error_of(response: Any) -> dict[str, Any]:
    try:
        return dict(response.json().get("error") or {})
    except (ValueError, AttributeError):
        return {"message": f"HTTP {response.status_code}: {response.text[:500]}"}


def _submit_local(body: dict[str, Any], registry: Optional[Path], base: str, database: Optional[str]) -> int:
    from carve.common.database import DatabaseError
    from carve.common.paths import registry_dir
    from carve.jobs.api import JobView
    from carve.jobs.service import InlineLauncher, JobRejected, JobService

    try:
        service = JobService(registry or registry_dir(), base, InlineLauncher(), recover=False, database=database)
        job = service.submit(body)  # runs to its end here
    except DatabaseError as exc:
        raise fail(str(exc))
    except JobRejected as exc:
        _print_rejection({"message": str(exc).split(":")[0], "problems": exc.problems})
        return 2
    return _report(JobView.of(job).model_dump())


def _report(job: dict[str, Any]) -> int:
    if job["status"] == "succeeded":
        adapter = job.get("adapter") or {}
        typer.echo(f"{job['id']} succeeded: adapter {adapter.get('name')} v{adapter.get('version')} is registered under tag {job['tag']}")
        if job.get("choice"):
            typer.echo(f"registered the {job['choice']['chosen'].replace('_', '-')} adapter: {job['choice']['reason']}")
        return 0
    typer.secho(f"{job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""), fg=typer.colors.RED, err=True)
    return 1
