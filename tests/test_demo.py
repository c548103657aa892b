"""`carve demo`'s run folder: resumed under the same settings, a new one under others."""

from __future__ import annotations

from pathlib import Path

from specialize_tiny import write_corpus, write_seed_set

from carve.cli.demo import settings_folder
from carve.specialize.config import build_config


def test_demo_folder_follows_settings_and_inputs(tmp_path: Path) -> None:
    seeds, corpus = write_seed_set(tmp_path / "seeds"), write_corpus(tmp_path / "corpus.jsonl")
    quick = build_config("quick", base="smollm2-135m-instruct")
    first = settings_folder(tmp_path / "runs", quick, seeds, corpus)
    assert first.parent == tmp_path / "runs" and first.name.startswith("quick-")
    assert settings_folder(tmp_path / "runs", build_config("quick", base="smollm2-135m-instruct"), seeds, corpus) == first  # a killed demo resumes here
    assert settings_folder(tmp_path / "runs", build_config("quick", base="smollm2-135m-instruct", seed_demonstrations=0), seeds, corpus) != first
    (seeds / "seeds.jsonl").write_text((seeds / "seeds.jsonl").read_text().replace("measles", "mumps"))
    assert settings_folder(tmp_path / "runs", quick, seeds, corpus) != first
