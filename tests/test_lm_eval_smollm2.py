"""lm-evaluation-harness against Carve serving the real SmolLM2 with a LoRA adapter: its `local-completions` client
scores and generates exactly as its own `hf` backend with the same PEFT folder on the same base (see test_lm_eval.py).

Run under the offline wrapper:
    ../shared/tools/offline .venv/bin/python -m pytest -q tests/test_lm_eval_smollm2.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from live_server import carve_home, local_server
from lm_eval_run import GEN, MC, assert_matches, evaluate
from tiny import build_adapter

pytestmark = [pytest.mark.ray, pytest.mark.integration]
lm_eval = pytest.importorskip("lm_eval")


def test_smollm2_adapter_over_http_scores_and_generates_as_the_hf_backend(tmp_path: Path) -> None:
    from carve.adapters.registry import Registry
    from carve.engine.models import resolve_model

    smol = resolve_model("smollm2-135m-instruct")
    adapter = build_adapter(smol.path, tmp_path / "smol-lora", seed=11, rank=8, scale=0.02)
    with carve_home(tmp_path / "home") as home:
        Registry(home / "registry").add(adapter, "smol-fin", base=smol)
        with local_server(smol.path, home / "registry", max_adapters=1, num_cpus=2, engine_num_cpus=0, precision="fp32", max_tokens_cap=64, default_max_tokens=16) as url:
            args = {
                "model": "smol-fin", "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface", "tokenizer": smol.path,
                "tokenized_requests": True, "max_length": 2048, "max_gen_toks": 16,
            }
            served = evaluate("local-completions", args, [MC, GEN])
    local = evaluate("hf", {"pretrained": smol.path, "peft": adapter, "dtype": "float32", "device": "cpu"}, [MC, GEN])
    worst = assert_matches(served, local)
    print(f"\nSmolLM2 + LoRA, lm-eval {MC}: acc {served['results'][MC]['acc,none']:.4f} (both backends), "
          f"max |loglikelihood difference| {worst:.2e}; {GEN} exact match {served['results'][GEN]['exact_match,none']:.4f}")
