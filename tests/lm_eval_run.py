"""Helpers for the tests that run lm-evaluation-harness: its evaluation call, per-document results, the exact comparison.

Tasks: data/eval/lm_eval (a loglikelihood multiple-choice task and a generate_until task over shipped samples).
"""

from __future__ import annotations

import os
from contextlib import chdir
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here comes from a hub; fail at once instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "data" / "eval" / "lm_eval"
MC, GEN = "carve_fpb_sentiment", "carve_ncbi_disease"


def evaluate(model: str, model_args: dict[str, Any], tasks: list[str], chat: bool = False) -> dict[str, Any]:
    """lm-eval's simple_evaluate (what its CLI runs) with per-document samples, from the repository root
    (the tasks' data_files are relative to it)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {k: str(v) if isinstance(v, Path) else v for k, v in model_args.items()}
    with chdir(REPO):
        return simple_evaluate(
            model=model, model_args=args, tasks=tasks, task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
            apply_chat_template=chat, batch_size=4, bootstrap_iters=0,
        )


def by_doc(results: dict[str, Any], task: str) -> dict[int, Any]:
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


def assert_matches(served: dict[str, Any], local: dict[str, Any], tasks: tuple[str, ...] = (MC, GEN)) -> float:
    """The same accuracy, per-document loglikelihoods within 1e-3 (and is_greedy equal), identical generations.

    Returns the largest loglikelihood difference."""
    worst = 0.0
    if MC in tasks:
        assert served["results"][MC]["acc,none"] == local["results"][MC]["acc,none"]
        got, want = by_doc(served, MC), by_doc(local, MC)
        assert got.keys() == want.keys() and len(got) == 12
        worst = max(abs(a[0] - b[0]) for doc in got for a, b in zip(got[doc], want[doc]))
        assert worst < 1e-3, worst
        assert all([a[1] for a in got[doc]] == [b[1] for b in want[doc]] for doc in got)  # is_greedy too
    if GEN in tasks:
        assert by_doc(served, GEN) == by_doc(local, GEN)
        assert served["results"][GEN]["exact_match,none"] == local["results"][GEN]["exact_match,none"]
    return worst
