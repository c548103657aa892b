"""The self-specialization run end to end on the tiny model: every stage, packaging, resume.

See tests/specialize_tiny.py for why stage-1 generations are written first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from specialize_tiny import FRESH_ITEMS, SEEDS, write_corpus, write_generations, write_seed_set

from carve.specialize.config import build_config
from carve.specialize.filters import RESPONSE_FILTERS
from carve.specialize.run import ITERATION_2, SEED_ADAPTER, SEEDED, Manifest, RunError, prepare, run_specialization
from carve.specialize.store import read_jsonl

SETTINGS = dict(
    num_instructions=6,
    instruction_batch=4,
    instruction_max_new_tokens=16,
    seed_input_chars=60,
    max_prompts=8,
    prompt_style="raw",
    fluency_margin=50.0,  # a random model finds every text unlikely: the filter runs, rejecting nothing
    top_k=3,
    document_words=20,
    response_batch=2,
    response_max_new_tokens=6,
    training={"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "max_length": 400, "save_every_steps": 1},
)


def tiny_config(base: Path, **extra):
    return build_config("quick", base=str(base), **{**SETTINGS, **extra})


def start_run(config, seeds: Path, corpus: Path, out: Path, iterations: int = 1):
    """A run folder as a run interrupted after writing its stage-1 generations leaves it."""
    inputs = prepare(config, seeds, corpus, out, resume=False)
    out.mkdir(parents=True)
    Manifest.open(inputs)
    write_generations(out, prompts=4)
    if iterations == 2:
        write_generations(out / ITERATION_2, prompts=4, items_pool=FRESH_ITEMS)
    return inputs


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("domain")
    return write_seed_set(root / "seeds"), write_corpus(root / "corpus.jsonl")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, domain_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A complete two-iteration run on the tiny model."""
    seeds, corpus = domain_files
    out = tmp_path_factory.mktemp("runs") / "full"
    inputs = start_run(tiny_config(tiny_model_dir, iterations=2), seeds, corpus, out, iterations=2)
    return out, run_specialization(inputs)


def test_every_stage_writes_its_artifact(finished_run: tuple[Path, dict]) -> None:
    out, result = finished_run
    kept = read_jsonl(out / "instructions.jsonl")
    assert len(kept) == 6 and len({k["id"] for k in kept}) == 6
    counts = json.loads((out / "filter_counts.json").read_text())
    rejected = read_jsonl(out / "rejected.jsonl")
    assert counts["kept"] == 6 and sum(counts["removed"].values()) == len(rejected)
    assert counts["parsed"] == counts["kept"] + len(rejected)
    assert counts["fluency_limit"] > 50.0

    hits = {r["id"]: r for r in read_jsonl(out / "retrieval.jsonl")}
    assert set(hits) == {k["id"] for k in kept}
    for hit in hits.values():
        assert len(hit["docs"]) == 3 and hit["scores"] == sorted(hit["scores"], reverse=True)
        assert sum(hit["weights"]) == pytest.approx(1.0)

    responses = read_jsonl(out / "responses.jsonl")
    assert [r["id"] for r in responses] == [k["id"] for k in kept]
    assert all(r["rule"] == "mixture" and r["branches"] == 3 and r["adapter"] == SEEDED for r in responses)

    # stage 0 trained on each seed twice (quick's seed_demonstrations=2): alone, then after two other seeds, its own task's first
    seeds_part = read_jsonl(out / SEED_ADAPTER / "training_set.jsonl")
    assert [r["source"] for r in seeds_part] == ["seed"] * 2 * len(SEEDS)
    for seed, alone, shown in zip(SEEDS, seeds_part[0::2], seeds_part[1::2]):
        assert "demos" not in alone and (alone["instruction"], alone["output"]) == (shown["instruction"], shown["output"]) == (seed["instruction"], seed["output"])
        assert len(shown["demos"]) == 2 and all(d["output"] != seed["output"] for d in shown["demos"])
        same_task = [s["output"] for s in SEEDS if s["task"] == seed["task"] and s is not seed]
        assert [d["output"] for d in shown["demos"]][: len(same_task)] == same_task[:2]
    seed_training = result["counts"]["seed_training"]
    assert seed_training["examples"] == 2 * len(SEEDS) - seed_training["skipped_too_long"]
    assert (out / SEED_ADAPTER / "final" / "adapter_model.safetensors").is_file()

    # stage 4 continued that adapter on the generated pairs that passed the response filters
    training_set = read_jsonl(out / "training_set.jsonl")
    dropped = read_jsonl(out / "rejected_responses.jsonl")
    assert training_set and all(r["source"] == "synthetic" for r in training_set)
    assert len(training_set) + len(dropped) == len(responses)
    assert all(r["filter"] in RESPONSE_FILTERS and r["reason"] for r in dropped)
    train = result["counts"]["training"]
    responses_counts = result["counts"]["responses"]
    assert responses_counts["kept"] == len(training_set) and responses_counts["seed_examples"] == 0
    assert set(responses_counts["removed"]) == {"empty", "repetitive", "echo", "copied", "markup"}
    assert train["examples"] == responses_counts["kept"] - train["skipped_too_long"]
    assert train["steps"] == 2 * -(-train["examples"] // 4)
    assert (out / "train" / "final" / "adapter_model.safetensors").is_file()
    assert any((out / "train" / "checkpoints").glob("step-*/optimizer.pt"))

    # iteration 2: a fresh set, decoded contrastively against the base
    second = read_jsonl(out / ITERATION_2 / "responses.jsonl")
    assert second and all(r["rule"] == "contrast" and r["branches"] == 2 for r in second)
    assert not {r["instruction"] for r in second} & {k["instruction"] for k in kept}
    assert (out / ITERATION_2 / "train" / "final" / "adapter_model.safetensors").is_file()
    assert set(result["timings_s"]) >= {"seed_training", "instructions", "retrieval", "responses", "training", "instructions_iter2", "training_iter2", "package"}


def test_iteration_two_can_decode_iteration_one_instructions_again(
    tiny_model_dir: Path, domain_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The paper's other arm of iteration 2: the same instructions, answered again contrastively by the specialized adapter."""
    from carve.cli.specialize import print_summary

    seeds, corpus = domain_files
    out = tmp_path / "same"
    result = run_specialization(start_run(tiny_config(tiny_model_dir, iterations=2, iteration_instructions="same"), seeds, corpus, out))
    kept = read_jsonl(out / "instructions.jsonl")
    assert result["counts"]["instructions_iter2"] == {"reused": len(kept), "from": "iteration 1"}
    assert "instructions_iter2" not in result["timings_s"]
    second = read_jsonl(out / ITERATION_2 / "responses.jsonl")
    assert [r["instruction"] for r in second] == [k["instruction"] for k in kept]
    assert all(r["rule"] == "contrast" and r["branches"] == 2 for r in second)
    assert (out / ITERATION_2 / "train" / "final" / "adapter_model.safetensors").is_file()
    print_summary(result, out)
    assert "reused=" in capsys.readouterr().out


def test_summary_lists_counts_filters_and_timings(finished_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    from carve.cli.specialize import print_summary

    out, result = finished_run
    print_summary(result, out)
    shown = capsys.readouterr().out
    for expected in ("instructions_iter2", "near_duplicate", "training", "total", "generated examples passed every filter", str(out / "adapter")):
        assert expected in shown
    synthetic = [r for r in read_jsonl(out / "training_set.jsonl") if r["source"] == "synthetic"]
    assert ("Instruction: " + synthetic[0]["instruction"][:20] in shown) if synthetic else ("0 generated examples" in shown)


def test_packaged_adapter_and_card(finished_run: tuple[Path, dict], tiny_model_dir: Path) -> None:
    from carve.artifact import CARD_FILE, AdapterCard
    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.loading import open_engine
    from carve.specialize.seeds import load_seed_set

    out, result = finished_run
    adapter = out / "adapter"
    card = AdapterCard.model_validate_json((adapter / CARD_FILE).read_text())
    manifest = json.loads((out / "run.json").read_text())
    assert card.base_fingerprint == manifest["identity"]["base"]["fingerprint"]
    assert card.seeds_hash == load_seed_set(Path(manifest["seeds_path"])).content_hash
    assert card.corpus_hash and card.corpus_hash.startswith("sha256:")
    assert card.counts["instructions"]["kept"] == 6 and card.hyperparameters["training"]["lora_r"] == 8
    assert card.domain.tag == "tinybio" and card.evaluation is None
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == card.base_model_id
    assert config["r"] == 8 and config["lora_alpha"] == 16
    engine, _, _ = open_engine(str(tiny_model_dir), [("tinybio", adapter)])
    text = engine.generate([GenerationRequest.single("Name the gene.", "tinybio", Sampling(max_new_tokens=3))])[0]
    assert text.token_ids


def test_rerun_of_a_finished_run_generates_nothing(finished_run: tuple[Path, dict], tiny_model_dir: Path, domain_files: tuple[Path, Path]) -> None:
    out, _ = finished_run
    before = {name: (out / name).read_bytes() for name in ("generations.jsonl", "retrieval.jsonl", "responses.jsonl")}
    steps_before = sorted(p.name for p in (out / "train" / "checkpoints").glob("step-*"))
    seeds, corpus = domain_files
    run_specialization(prepare(tiny_config(tiny_model_dir, iterations=2), seeds, corpus, out, resume=True))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (out / "train" / "checkpoints").glob("step-*")) == steps_before


def test_resume_refuses_other_settings_and_needs_flag(finished_run: tuple[Path, dict], tiny_model_dir: Path, domain_files: tuple[Path, Path]) -> None:
    out, _ = finished_run
    seeds, corpus = domain_files
    with pytest.raises(RunError, match="top_k: 3 then, 2 now"):
        prepare(tiny_config(tiny_model_dir, iterations=2, top_k=2), seeds, corpus, out, resume=True)
    with pytest.raises(RunError, match="--resume"):
        prepare(tiny_config(tiny_model_dir, iterations=2), seeds, corpus, out, resume=False)


def test_seed_adapter_writes_the_responses(finished_run: tuple[Path, dict], tiny_model_dir: Path, domain_files: tuple[Path, Path]) -> None:
    """The stored responses are what the stage-0 adapter decodes for the same requests, not what the base would."""
    from carve.engine.loading import open_engine
    from carve.specialize.responses import build_request
    from carve.specialize.retrieval import load_corpus
    from carve.specialize.seeds import load_seed_set

    out, _ = finished_run
    seeds, corpus = domain_files
    config = tiny_config(tiny_model_dir, iterations=2)
    engine, _, _ = open_engine(str(tiny_model_dir))
    engine.load_adapter(SEEDED, out / SEED_ADAPTER / "final")
    hits = {r["id"]: r for r in read_jsonl(out / "retrieval.jsonl")}
    documents = load_corpus(corpus).by_id()
    domain = load_seed_set(seeds).domain
    kept = read_jsonl(out / "instructions.jsonl")
    written = [r["output"] for r in read_jsonl(out / "responses.jsonl")]
    requests = [build_request(config, domain, engine.tokenizer, item, hits[item["id"]], documents, adapter=SEEDED) for item in kept]
    assert [c.text.strip() for c in engine.generate(requests)] == written
    base_requests = [build_request(config, domain, engine.tokenizer, item, hits[item["id"]], documents) for item in kept]
    assert [c.text.strip() for c in engine.generate(base_requests)] != written, "the base would have written the same"


def test_retrieval_none_and_top1_ablations(tiny_model_dir: Path, domain_files: tuple[Path, Path], tmp_path: Path) -> None:
    from carve.engine.loading import open_engine
    from carve.specialize.responses import build_request
    from carve.specialize.retrieval import load_corpus
    from carve.specialize.seeds import load_seed_set

    seeds, corpus_path = domain_files
    engine, _, _ = open_engine(str(tiny_model_dir))
    domain = load_seed_set(seeds).domain
    corpus = load_corpus(corpus_path)
    documents = {d.id: d for d in corpus.documents}
    item = {"id": "x", "instruction": "Which gene was measured?", "input": "BRCA1 in tissue."}
    hit = {"docs": ["d2", "d6", "d1"], "scores": [3.0, 1.0, 0.5], "weights": [0.8, 0.1, 0.1]}
    none = build_request(tiny_config(tiny_model_dir, retrieval="none"), domain, engine.tokenizer, item, hit, documents)
    top1 = build_request(tiny_config(tiny_model_dir, retrieval="top1"), domain, engine.tokenizer, item, hit, documents)
    marginal = build_request(tiny_config(tiny_model_dir), domain, engine.tokenizer, item, hit, documents)
    assert none.rule == "single" and "Document:" not in none.branches[0].prompt
    assert top1.rule == "single" and "Gene expression of BRCA1" in top1.branches[0].prompt
    assert marginal.rule == "mixture" and [b.weight for b in marginal.branches] == [0.8, 0.1, 0.1]
    assert "tumour grew" in marginal.branches[1].prompt


def test_sigkill_mid_responses_then_resume(tiny_model_dir: Path, domain_files: tuple[Path, Path], finished_run: tuple[Path, dict], tmp_path: Path) -> None:
    """Kill a real `carve specialize` process mid-stage; the resumed run equals the uninterrupted one."""
    seeds, corpus = domain_files
    out = tmp_path / "killed"
    start_run(tiny_config(tiny_model_dir), seeds, corpus, out)
    script = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_specialize_pipeline import tiny_config;"
        "from carve.specialize.run import prepare, run_specialization;"
        "run_specialization(prepare(tiny_config(Path(sys.argv[2])), Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), resume=True))"
    )
    command = [sys.executable, "-c", script, str(Path(__file__).parent), str(tiny_model_dir), str(seeds), str(corpus), str(out)]
    env = dict(os.environ)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    responses = out / "responses.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if responses.exists() and responses.read_bytes().count(b"\n") >= 2:
            break
        if process.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = responses.read_bytes().count(b"\n")
    assert 2 <= done_before < 6, "the kill should land mid-stage"

    inputs = prepare(tiny_config(tiny_model_dir), seeds, corpus, out, resume=True)
    run_specialization(inputs)
    ids = [r["id"] for r in read_jsonl(responses)]
    assert len(ids) == len(set(ids)), "an item was generated twice"
    reference, _ = finished_run
    assert ids == [r["id"] for r in read_jsonl(reference / "responses.jsonl")]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_evaluation_compares_the_seeds_only_adapter_and_the_choice_follows_the_scores(
    finished_run: tuple[Path, dict], tiny_model_dir: Path, domain_files: tuple[Path, Path]
) -> None:
    from carve.engine.loading import open_engine
    from carve.specialize.run import SEEDS_ONLY, SELF_SPECIALIZED, _evaluate, choose_adapter

    out, _ = finished_run
    seeds, corpus = domain_files
    tasks = Path(__file__).resolve().parent.parent / "data" / "eval" / "biomed" / "bioasq_yesno.jsonl"
    inputs = prepare(tiny_config(tiny_model_dir, iterations=2), seeds, corpus, out, resume=True, eval_tasks=tasks)
    engine, _, _ = open_engine(str(tiny_model_dir))
    summary = _evaluate(engine, out / SEED_ADAPTER / "final", out / "adapter", inputs, tasks, {"shots": [0], "limit": 1})
    assert {score["model"] for score in summary["macro"]} == {"base", SEEDS_ONLY, SELF_SPECIALIZED}
    assert all(0 <= score["f1"] <= 100 and score["k"] == 0 for score in summary["macro"])
    assert {(g["model"], g["baseline"]) for g in summary["gains"]} == {(SEEDS_ONLY, "base"), (SELF_SPECIALIZED, "base"), (SELF_SPECIALIZED, SEEDS_ONLY)}

    from carve.evaluation.schema import EvalReport, Gain, Score

    def report(seeds_f1: float, ours_f1: float) -> EvalReport:
        macro = [Score(task="macro average", model=m, k=k, f1=f, rouge_l=f, n=1, shots_used=0, inputs_trimmed=0)
                 for k in (0, 5) for m, f in (("base", 10.0), (SEEDS_ONLY, seeds_f1), (SELF_SPECIALIZED, ours_f1))]
        gains = [Gain(model=SELF_SPECIALIZED, baseline=SEEDS_ONLY, k=k, metric="f1", gain=ours_f1 - seeds_f1, low=-1, high=1,
                      tasks_better=0, tasks_worse=0, worst_task="t", worst_task_gain=0) for k in (0, 5)]
        return EvalReport(base_model="b", models={}, shots=[0, 5], tasks=[], demos=None, limit=None, max_context=1, batch_size=1,
                          scores=[], macro=macro, gains=gains, generations=0, wall_time_s=0)

    worse = choose_adapter(report(30.0, 28.0))
    assert worse["chosen"] == SEEDS_ONLY and "below seeds-only 30.00" in worse["reason"] and worse["macro_f1"]["base"] == 10.0
    assert choose_adapter(report(30.0, 30.0))["chosen"] == SELF_SPECIALIZED  # a tie keeps the self-specialized adapter
    assert [g["k"] for g in choose_adapter(report(30.0, 33.0))["gain_over_seeds_only"]] == [0, 5]
