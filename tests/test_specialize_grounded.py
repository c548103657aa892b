"""Corpus-grounded instances (``instances: corpus``): task shapes, input selection, the answer judge, a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carve.specialize.config import build_config
from carve.specialize.grounded import (
    ANSWERS,
    GROUNDED_FILTERS,
    INSTANCES,
    REJECTED_INSTANCES,
    corpus_sentences,
    judge,
    select_instances,
    shaped,
    tagged_items,
    task_shapes,
)
from carve.specialize.retrieval import BM25Index, load_corpus
from carve.specialize.run import TRAINING_SET, Manifest, RunError, prepare, run_specialization
from carve.specialize.seeds import load_seed_set
from carve.specialize.store import read_jsonl

GENE = "Find the genes in the sentence. Write each as 'mention <Gene>', separated by commas."
HALLMARK = "Which hallmark is this sentence evidence for? Choose among Resisting cell death, Inducing angiogenesis, Genomic instability."
SEEDS = [
    {"instruction": GENE, "input": "BRCA1 binds to p53 in cells .", "output": "BRCA1 <Gene>, p53 <Gene>", "task": "genes"},
    {"instruction": GENE, "input": "The TP53 gene was mutated .", "output": "TP53 <Gene>", "task": "genes"},
    {"instruction": GENE, "input": "Expression of MYC rose ( twofold ) .", "output": "MYC <Gene>", "task": "genes"},
    {"instruction": GENE, "input": "KRAS and EGFR were sequenced .", "output": "KRAS <Gene>, EGFR <Gene>", "task": "genes"},
    {"instruction": HALLMARK, "input": "VEGF drives new vessel growth in tumours .", "output": "Inducing angiogenesis", "task": "hallmarks"},
    {"instruction": HALLMARK, "input": "The cells escaped apoptosis .", "output": "Resisting cell death", "task": "hallmarks"},
    {"instruction": "Answer the question from the context.", "input": "Context: BRCA1 is a gene.\nQuestion: Is BRCA1 a gene?", "output": "yes", "task": "qa"},
]
CORPUS = [
    {"id": "a1", "title": "BRCA1 and p53 in breast tissue", "text": "We found that BRCA1 binds p53 in breast cells. The MYC gene was amplified in two of ten tumours. Short."},
    {"id": "a2", "title": "", "text": "Tumour cells resisted apoptosis after treatment with cisplatin. VEGF levels predicted vessel growth in the tumours."},
    {"id": "a3", "title": "Revenue", "text": "Revenue rose twelve percent in the third quarter, the company said on Monday."},
]


@pytest.fixture()
def domain(tmp_path: Path) -> tuple[Path, Path]:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "domain.json").write_text(json.dumps({"name": "biomedical", "tag": "tinygrounded", "description": "Tiny grounded domain."}))
    (seeds / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return seeds, corpus


def test_task_shapes_read_the_input_and_answer_form_from_the_seeds(domain: tuple[Path, Path]) -> None:
    shapes, skipped = task_shapes(load_seed_set(domain[0]))
    by_name = {s.name: s for s in shapes}
    assert set(by_name) == {"genes", "hallmarks"} and set(skipped) == {"qa"} and "parts" in skipped["qa"]
    assert by_name["genes"].form == "tagged" and by_name["genes"].types == {"Gene"} and by_name["genes"].split_punctuation == ".,;:()[]"
    assert by_name["genes"].max_words == 12  # the longest seed input (8 words) and a half
    assert by_name["hallmarks"].form == "label" and by_name["hallmarks"].labels == {"inducing angiogenesis", "resisting cell death"}


def test_tagged_answers_and_shaped_inputs() -> None:
    assert tagged_items("hTAF ( II ) 80 <GENE>, MDM2 <GENE>") == [("hTAF ( II ) 80", "GENE"), ("MDM2", "GENE")]
    assert tagged_items("MDM2 binds p53") is None and tagged_items("MDM2 <GENE> p53") is None
    assert shaped("IL-1 (in cells), was low.", ".,;:()[]-/") == "IL - 1 ( in cells ) , was low ."
    assert shaped("IL-1 (in cells), was low.", ".,;:()[]") == "IL-1 ( in cells ) , was low ."
    assert shaped("IL-1  (in cells).", "") == "IL-1 (in cells)."


def test_the_judge_keeps_only_agreeing_answers_in_the_seeds_form(domain: tuple[Path, Path]) -> None:
    shapes, _ = task_shapes(load_seed_set(domain[0]))
    genes, hallmarks = sorted(shapes, key=lambda s: s.name)
    item = {"input": "MYC and KRAS were high ."}
    assert judge(["MYC <Gene>, KRAS <Gene>", "KRAS <Gene> , MYC <Gene>"], item, genes) is None  # the same items in another order
    assert judge(["MYC <Gene>", "KRAS <Gene>"], item, genes)[0] == "disagree"
    assert judge(["TP53 <Gene>", "TP53 <Gene>"], item, genes)[0] == "not_in_input"
    assert judge(["MYC <Protein>", "MYC <Protein>"], item, genes)[0] == "unknown_type"
    assert judge(["MYC is high", "MYC is high"], item, genes)[0] == "unknown_type"
    assert judge(["", ""], item, genes)[0] == "empty"
    assert judge(["Genomic instability", "genomic instability"], item, hallmarks) is None  # named by the instruction, not by a seed
    assert judge(["Cell cycle arrest", "Cell cycle arrest"], item, hallmarks)[0] == "unknown_label"


def test_inputs_are_corpus_sentences_near_the_task_seeds_never_a_seed(domain: tuple[Path, Path], tmp_path: Path) -> None:
    seed_set = load_seed_set(domain[0])
    shapes, _ = task_shapes(seed_set)
    sentences = corpus_sentences(load_corpus(domain[1]))
    assert all(6 <= len(d.text.split()) <= 200 for d in sentences.documents) and "a1#0" in {d.id for d in sentences.documents}
    index = BM25Index.open(sentences, tmp_path / "bm25")
    chosen = select_instances(shapes, sentences, index, per_task=2)
    assert chosen == select_instances(shapes, sentences, BM25Index.open(sentences, tmp_path / "bm25"), per_task=2)
    assert [c["task"] for c in chosen] == ["genes", "genes", "hallmarks", "hallmarks"]
    assert all(c["input"].endswith(" .") and len(c["input"].split()) <= 12 for c in chosen)  # the seeds' split punctuation and length
    seed_inputs = {s.input for s in seed_set.seeds}
    assert not seed_inputs & {c["input"] for c in chosen}
    assert chosen[0]["doc"].startswith("a1#")  # BRCA1/p53/MYC sentences for the gene task


def _config(base: Path, **extra):
    return build_config(
        "quick", base=str(base), instances="corpus", corpus_per_task=2, response_batch=3, response_max_new_tokens=6, prompt_style="raw",
        training={"epochs": 1, "batch_size": 2, "micro_batch_size": 2, "max_length": 400, "save_every_steps": 0}, **extra,
    )


def test_corpus_instances_need_a_corpus_and_one_iteration(tiny_model_dir: Path, domain: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(RunError, match="corpus"):
        prepare(_config(tiny_model_dir, retrieval="none"), domain[0], None, tmp_path / "run", resume=False)
    with pytest.raises(ValueError, match="one iteration"):
        _config(tiny_model_dir, iterations=2)
    assert not (tmp_path / "run").exists()


def test_a_run_trains_the_seed_adapter_on_the_judged_corpus_instances(tiny_model_dir: Path, domain: tuple[Path, Path], tmp_path: Path) -> None:
    """Answers written before the run (as an interrupted run leaves them): the tiny random model never writes tagged ones."""
    seeds, corpus = domain
    out = tmp_path / "run"
    inputs = prepare(_config(tiny_model_dir), seeds, corpus, out, resume=False)
    out.mkdir()
    Manifest.open(inputs)
    shapes, _ = task_shapes(inputs.seed_set)
    sentences = corpus_sentences(inputs.corpus)
    chosen = {c["id"]: c for c in select_instances(shapes, sentences, BM25Index.open(sentences, tmp_path / ".carve-bm25"), 2)}
    first_gene = chosen["corpus-genes-000"]["input"]
    mention = next(word for word in first_gene.split() if word.isupper() and len(word) > 2)
    written = {"corpus-genes-000": [f"{mention} <Gene>", f"{mention} <Gene>"], "corpus-genes-001": ["X1 <Gene>", "X2 <Gene>"]}
    (out / ANSWERS).write_text("".join(json.dumps({"id": k, "answers": v, "tokens": 4}) + "\n" for k, v in written.items()))

    result = run_specialization(inputs)

    assert [r["id"] for r in read_jsonl(out / INSTANCES)] == list(chosen)
    answers = {r["id"]: r for r in read_jsonl(out / ANSWERS)}
    assert set(answers) == set(chosen) and answers["corpus-genes-000"]["answers"] == written["corpus-genes-000"]
    assert all(len(answers[i]["answers"]) == (2 if i.startswith("corpus-genes") else 1) for i in chosen)  # hallmarks: 2 seeds, one view
    rejected = {r["id"]: r for r in read_jsonl(out / REJECTED_INSTANCES)}
    assert rejected["corpus-genes-001"]["filter"] == "disagree" and "corpus-genes-000" not in rejected
    counts = result["counts"]["corpus_instances"]
    assert counts["instances"] == 4 and counts["kept"] == 4 - len(rejected) and counts["kept_per_task"]["genes"] == 1
    assert set(counts["removed"]) == set(GROUNDED_FILTERS) and sum(counts["removed"].values()) == len(rejected)
    assert "qa" in counts["skipped_tasks"]
    training = read_jsonl(out / TRAINING_SET)
    kept = [r for r in training if r["id"].startswith("corpus-genes-000")]
    assert [r.get("demos") is not None for r in kept] == [False, True]  # alone, then after the first view's two seeds
    assert kept[0]["output"] == f"{mention} <Gene>" and [d["output"] for d in kept[1]["demos"]] == ["BRCA1 <Gene>, p53 <Gene>", "TP53 <Gene>"]
    assert result["counts"]["training"]["examples"] == len(training) - result["counts"]["training"]["skipped_too_long"]
    assert (out / "train" / "final" / "adapter_model.safetensors").is_file() and (out / "adapter" / "carve-card.json").is_file()
    card = json.loads((out / "adapter" / "carve-card.json").read_text())
    assert card["counts"]["corpus_instances"]["kept"] == counts["kept"]
    again = run_specialization(prepare(_config(tiny_model_dir), seeds, corpus, out, resume=True))["counts"]
    assert again["corpus_instances"] == counts and again["training"]["steps"] == result["counts"]["training"]["steps"]
