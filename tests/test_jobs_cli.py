"""`carve submit` against a real HTTP server that mounts carve.jobs.http, and in local mode."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

from carve.cli.app import app
from carve.cli.submit import parse_settings
from carve.jobs.http import JobsHttp
from carve.jobs.service import JobService, JobSettings
from carve.jobs.store import JobStore

REPO = Path(__file__).resolve().parents[1]


class RecordingLauncher:
    """Accepts jobs without running them (the run itself is tested in test_jobs.py): they stay queued."""

    background = False  # never relaunched by the service: each launch is recorded once

    def __init__(self) -> None:
        self.launched: list[str] = []

    def launch(self, root: Path, job_id: str, settings: Any, database: str) -> None:
        self.launched.append(job_id)

    def cancel(self, job_id: str) -> None:
        return None

    def crashed(self) -> dict[str, str]:
        return {}


def serve_jobs(http: JobsHttp) -> ThreadingHTTPServer:
    """The four /v1/specializations endpoints on a stdlib server: how little mounting JobsHttp takes."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, reply: tuple[int, dict]) -> None:
            status, body = reply
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            self._reply(http.submit(self.rfile.read(int(self.headers.get("content-length", 0)))))

        def do_GET(self) -> None:  # noqa: N802
            job_id = self.path.rstrip("/").split("/")[-1]
            self._reply(http.list() if job_id == "specializations" else http.get(job_id))

        def do_DELETE(self) -> None:  # noqa: N802
            self._reply(http.cancel(self.path.rstrip("/").split("/")[-1]))

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture()
def server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path, RecordingLauncher]]:
    launcher = RecordingLauncher()
    root = tmp_path / "registry"
    httpd = serve_jobs(JobsHttp(JobService(root, str(tiny_model_dir), launcher, JobSettings())))
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, launcher
    finally:
        httpd.shutdown()


def test_submit_to_a_server(server: tuple[str, Path, RecordingLauncher], tmp_path: Path) -> None:
    url, root, launcher = server
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "title": "t", "text": "Aspirin relieves pain."}) + "\n")
    result = CliRunner().invoke(app, ["submit", str(REPO / "seeds" / "finance"), "--corpus", str(corpus), "--server", url, "--no-wait",
                                      "--set", "num_instructions=10", "--set", "training.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "submitted job-" in result.output and "(tag finance)" in result.output
    (job,) = JobStore(root).list()
    assert launcher.launched == [job.id] and job.status == "queued"
    assert job.request["settings"] == {"num_instructions": 10, "training": {"epochs": 1}}
    assert job.request["domain"]["name"] == "financial" and (job.corpus and job.corpus.read_text() == corpus.read_text())
    # GET and DELETE over HTTP
    import httpx

    assert httpx.get(f"{url}/v1/specializations/{job.id}").json()["status"] == "queued"
    assert httpx.delete(f"{url}/v1/specializations/{job.id}").json()["status"] == "cancelled"
    assert httpx.delete(f"{url}/v1/specializations/{job.id}").status_code == 409


def test_bad_seeds_are_refused_with_their_lines(server: tuple[str, Path, RecordingLauncher], tmp_path: Path) -> None:
    url, root, launcher = server
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c"}\n[1]\n')
    result = CliRunner().invoke(app, ["submit", str(seeds), "--tag", "legal", "--server", url])
    assert result.exit_code == 2
    assert "seeds line 2: field 'output': is required" in result.output and "seeds line 3: expected a JSON object" in result.output
    assert JobStore(root).list() == [] and launcher.launched == []
    # the same refusal without a server (local mode), and nothing is stored there either
    local = tmp_path / "local-registry"
    result = CliRunner().invoke(app, ["submit", str(seeds), "--tag", "legal", "--registry", str(local), "--base", str(root)])
    assert result.exit_code == 2 and "seeds line 2" in result.output and JobStore(local).list() == []


def test_cli_argument_errors(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("")
    result = CliRunner().invoke(app, ["submit", str(seeds)])
    assert result.exit_code == 2 and "give --tag" in result.output
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "missing.jsonl"), "--tag", "x"])
    assert result.exit_code == 2 and "no such file" in result.output
    assert parse_settings(["a=1", "t.epochs=2", "s=word"]) == {"a": 1, "t": {"epochs": 2}, "s": "word"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["novalue"])
