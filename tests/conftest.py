from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_adapter, build_model_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {name: build_adapter(tiny_model_dir, root / name, seed=i + 1) for i, name in enumerate(["alpha", "beta", "gamma"])}


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 (sliding-window layers with a window shorter than the test prompts)."""
    return build_model_folder(tmp_path_factory.mktemp("tiny-gemma") / "tiny-gemma3", seed=5, layers=3, architecture="gemma3")


@pytest.fixture(scope="session")
def tiny_gemma_adapters(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gemma-adapters")
    return {name: build_adapter(tiny_gemma_dir, root / name, seed=i + 7) for i, name in enumerate(["alpha", "beta", "gamma"])}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    """The tiny engine run directly with every adapter loaded: what a server or scheduler must answer."""
    from carve.engine.loading import open_engine

    return open_engine(str(tiny_model_dir), list(tiny_adapters.items()))[0]


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of another width: adapters of tiny_model_dir do not fit it."""
    return build_model_folder(tmp_path_factory.mktemp("other-model") / "tiny-wide", seed=3, hidden=96)


# -- databases: every registry and job-store test runs on SQLite and on a real PostgreSQL ---------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One PostgreSQL server for the session, from pgserver's bundled binaries, on a unix socket; its admin URL.

    As root, pgserver creates a system user ``pgserver`` and runs the server as
    it (PostgreSQL refuses to run as root), opening the data folder's parents
    to it: hence a folder of its own under /tmp, not pytest's private tmp.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns that XDG_RUNTIME_DIR is unset
        import pgserver

    folder = Path(tempfile.mkdtemp(prefix="carve-pg-"))
    server = pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server at ``server_url``, dropped afterwards; its URL."""
    import sqlalchemy as sa

    from carve.common.database import dispose_engines, parse_url

    admin = sa.create_engine(parse_url(server_url), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"carve_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        dispose_engines(url)  # this process's pooled connections; the test's child processes are gone
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[Optional[str]]:
    """The database of one test: None (the default, the registry folder's SQLite file) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    with postgres_database(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database (a cluster's registry and jobs)."""
    with postgres_database(postgres_server) as url:
        yield url
