"""Helpers for the tests that run the Carve server on a real local Ray: a private CARVE_HOME, a free port, a served model.

Run those tests under the offline wrapper (../shared/tools/offline).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CARVE_ENV = ("CARVE_HOME", "CARVE_REGISTRY", "CARVE_ADMIN_TOKEN", "CARVE_API_KEY")


@contextmanager
def carve_home(root: Path) -> Iterator[Path]:
    """CARVE_HOME at ``root`` and no registry, token or key from the environment, restored afterwards."""
    saved = {k: os.environ.get(k) for k in CARVE_ENV}
    os.environ["CARVE_HOME"] = str(root)
    for key in CARVE_ENV[1:]:
        os.environ.pop(key, None)
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def local_server(model: Path, registry_root: Path, **settings: Any) -> Iterator[str]:
    """`carve serve`'s application (gateway + engine) on loopback; its base URL. Serve is shut down afterwards."""
    from carve.platform.launcher import start_local_server, stop_local_server

    handle = start_local_server(str(model), registry_root, 0, **settings)  # a free port once Ray is up
    try:
        yield handle.url
    finally:
        stop_local_server()


@contextmanager
def tiny_server(home: Path, model: Path, adapter: Path, **settings: Any) -> Iterator[str]:
    """A server on the tiny model with one registered adapter, ``alpha``, in a private CARVE_HOME; its base URL."""
    from carve.adapters.registry import Registry

    with carve_home(home):
        registry = Registry(home / "registry")
        registry.add(adapter, "alpha", base=str(model))
        with local_server(model, registry.root, **settings) as url:
            yield url
