from __future__ import annotations

import sys
from pathlib import Path

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
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of another width: adapters of tiny_model_dir do not fit it."""
    return build_model_folder(tmp_path_factory.mktemp("other-model") / "tiny-wide", seed=3, hidden=96)
