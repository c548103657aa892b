"""lm-evaluation-harness against a real Carve server: its own `local-completions` and `local-chat-completions`
clients must score exactly what its own `hf` backend scores with the same adapter folder on the same base.

Tasks: data/eval/lm_eval (a loglikelihood multiple-choice task and a generate_until task over shipped samples).
Run under the offline wrapper:
    ../shared/tools/offline .venv/bin/python -m pytest -q tests/test_lm_eval.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest
from serving import carve_home, local_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from a hub; fail at once instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytestmark = pytest.mark.ray
lm_eval = pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "data" / "eval" / "lm_eval"
MC, GEN = "carve_fpb_sentiment", "carve_ncbi_disease"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Iterator[str]:
    from carve.adapters.registry import Registry

    with carve_home(tmp_path_factory.mktemp("carve-home")) as home:
        Registry(home / "registry").add(tiny_adapters["alpha"], "alpha", tags=["bio"], base=str(tiny_model_dir))
        with local_server(tiny_model_dir, home / "registry", max_adapters=2, num_cpus=2, engine_num_cpus=0, max_tokens_cap=64, default_max_tokens=16, batch_wait_s=0.02) as url:
            yield url


def evaluate(model: str, model_args: dict[str, Any], tasks: list[str], chat: bool = False) -> dict[str, Any]:
    """lm-eval's simple_evaluate (what its CLI runs) with per-document samples, from the repository root."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {k: str(v) if isinstance(v, Path) else v for k, v in model_args.items()}
    return simple_evaluate(
        model=model, model_args=args, tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
        apply_chat_template=chat, batch_size=4, bootstrap_iters=0,
    )


def by_doc(results: dict[str, Any], task: str) -> dict[int, Any]:
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


@pytest.fixture(scope="module", autouse=True)
def repo_cwd() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the tasks' data_files are relative to the repository root
        yield


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
    want = hf["plain"]
    assert carve["results"][MC]["acc,none"] == want["results"][MC]["acc,none"]
    served, local = by_doc(carve, MC), by_doc(want, MC)
    assert served.keys() == local.keys() and len(served) == 12
    worst = max(abs(a[0] - b[0]) for doc in served for a, b in zip(served[doc], local[doc]))
    assert worst < 1e-3, worst
    assert all([a[1] for a in served[doc]] == [b[1] for b in local[doc]] for doc in served)  # is_greedy too
    assert by_doc(carve, GEN) == by_doc(want, GEN)
    assert carve["results"][GEN]["exact_match,none"] == want["results"][GEN]["exact_match,none"]
    print(f"\nlm-eval {MC} ({tokenizer_backend} tokenizer): acc {carve['results'][MC]['acc,none']:.4f} (both backends), max |loglikelihood difference| {worst:.2e}")


def test_local_chat_completions_generates_exactly_as_the_hf_backend(server: str, hf: dict[str, Any]) -> None:
    args = {"model": "alpha", "base_url": f"{server}/v1/chat/completions", "max_gen_toks": 16}
    carve = evaluate("local-chat-completions", args, [GEN], chat=True)
    assert by_doc(carve, GEN) == by_doc(hf["chat"], GEN)
    assert carve["results"][GEN]["exact_match,none"] == hf["chat"]["results"][GEN]["exact_match,none"]
