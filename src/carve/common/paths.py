"""Where Carve keeps its files: one home folder, overridable piece by piece.

Everything defaults under ``$CARVE_HOME`` (``~/.carve`` when unset) so a user
can point a whole installation elsewhere with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def carve_home() -> Path:
    return Path(os.environ.get("CARVE_HOME", Path.home() / ".carve")).expanduser()


def model_cache_dir() -> Path:
    """Converted base models (GGUF turned into Hugging Face folders)."""
    env = os.environ.get("CARVE_MODEL_CACHE")
    return Path(env).expanduser() if env else carve_home() / "models"


def registry_dir() -> Path:
    """The adapter registry: adapter files, job run folders, and the default SQLite database."""
    env = os.environ.get("CARVE_REGISTRY")
    return Path(env).expanduser() if env else carve_home() / "registry"
