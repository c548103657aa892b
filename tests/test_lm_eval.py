"""lm-evaluation-harness against a real Carve server: its own `local-completions` and `local-chat-completions`
clients must score exactly what its own `hf` backend scores with the same adapter folder on the same base.

Tasks: data/eval/lm_eval (a loglikelihood multiple-choice task and a generate_until task over shipped samples).
Run under the offline wrapper:
    ../shared/tools/offline .venv/bin/python -m pytest -q tests/test_lm_eval.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from live_server import carve_home, local_server
from lm_eval_run import GEN, MC, assert_matches, evaluate

pytestmark = pytest.mark.ray
lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Iterator[str]:
    from carve.adapters.registry import Registry

    with carve_home(tmp_path_factory.mktemp("carve-home")) as home:
        Registry(home / "registry").add(tiny_adapters["alpha"], "alpha", tags=["bio"], base=str(tiny_model_dir))
        with local_server(tiny_model_dir, home / "registry", max_adapters=2, num_cpus=2, engine_num_cpus=0, max_tokens_cap=64, default_max_tokens=16, batch_wait_s=0.02) as url:
            yield url


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> dict[str, Any]:
    """lm-eval's own Hugging Face backend, the adapter loaded by peft on the same base folder."""
    args = {"pretrained": tiny_model_dir, "peft": tiny_adapters["alpha"], "dtype": "float32", "device": "cpu"}
    return {"plain": evaluate("hf", args, [MC, GEN]), "chat": evaluate("hf", args, [GEN], chat=True)}


@pytest.mark.parametrize("tokenizer_backend", ["huggingface", "remote"])  # remote: lm-eval tokenizes through Carve's /tokenize
def test_local_completions_scores_exactly_as_the_hf_backend(server: str, tiny_model_dir: Path, hf: dict[str, Any], tokenizer_backend: str) -> None:
    args = {
        "model": "alpha", "base_url": f"{server}/v1/completions", "tokenizer_backend": tokenizer_backend,
        "tokenized_requests": True, "max_length": 512, "max_gen_toks": 16,
    }
    if tokenizer_backend == "huggingface":
        args["tokenizer"] = tiny_model_dir
    carve = evaluate("local-completions", args, [MC, GEN])
    worst = assert_matches(carve, hf["plain"])
    print(f"\nlm-eval {MC} ({tokenizer_backend} tokenizer): acc {carve['results'][MC]['acc,none']:.4f} (both backends), max |loglikelihood difference| {worst:.2e}")


def test_local_chat_completions_generates_exactly_as_the_hf_backend(server: str, hf: dict[str, Any]) -> None:
    args = {"model": "alpha", "base_url": f"{server}/v1/chat/completions", "max_gen_toks": 16}
    carve = evaluate("local-chat-completions", args, [GEN], chat=True)
    assert_matches(carve, hf["chat"], (GEN,))
