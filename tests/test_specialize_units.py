"""Self-specialization parts that need no model: parser, filters, weights, corpus, stores, config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from specialize_tiny import write_corpus, write_seed_set

from carve.specialize.config import build_config
from carve.specialize.filters import DuplicateIndex, FilterSettings, check_pair, degenerate_response, rouge_l, rouge_tokens
from carve.specialize.fluency import engine_scorer, fluency_limit, mean_nll, pair_text
from carve.specialize.generate_instructions import FilterState
from carve.specialize.prompts import instruction_prompt, parse_task_list, response_prompt
from carve.specialize.retrieval import BM25Index, CorpusError, load_corpus, softmax
from carve.specialize.run import RunError, prepare
from carve.specialize.seeds import Domain, Seed, SeedSetError
from carve.specialize.store import JsonlStore

DOMAIN = Domain(name="biomedical", tag="bio", description="d")


# -- prompts and parser -----------------------------------------------------


def test_instruction_prompt_is_table3_with_seeds_and_open_item() -> None:
    seeds = [Seed(instruction=f"Task {i} here.", input=("Long input " * 40 if i == 1 else ""), output="o") for i in range(3)]
    prompt = instruction_prompt(DOMAIN, seeds, max_input_chars=50)
    assert "20 diverse task instructions about a biomedical domain" in prompt
    assert "while focusing on a biomedical domain" in prompt
    assert "1. Instruction: Task 0 here.\n1. Input: <noinput>\n2. Instruction: Task 1 here.\n2. Input: Long input" in prompt
    assert prompt.endswith("3. Input: <noinput>\n4. Instruction:")
    assert len(prompt.split("2. Input: ")[1].split("\n")[0]) <= 54
    text = response_prompt(DOMAIN, "Name the gene.", "BRCA1 was high.", "Doc text.")
    assert text.startswith("You are a biomedical domain expert. Given an instruction and an input, generate the best response to solve the given biomedical task.")
    assert "Document: Doc text." in text and text.endswith("Input: BRCA1 was high.\n\nResponse:")


def test_parser_reads_items_and_reports_malformed_ones() -> None:
    completion = (
        " Name the protein in the text.\n4. Input: p53 binds DNA.\n"
        "5. Instruction: Is aspirin an NSAID?\n6. Input: <noinput>\n"  # misnumbered input still pairs
        "6. Instruction: Summarize the abstract.\n"  # no input line
        "7. Instruction: List the symptoms.\n7. Input: Fever, cough\nand fatigue were seen.\n"  # multi-line input
        "8. Input: orphan input\n"
        "9. Instruction: Classify the\n"
    )
    items = parse_task_list(completion, truncated=True)
    assert [(i.instruction, i.input, i.problem) for i in items] == [
        ("Name the protein in the text.", "p53 binds DNA.", None),
        ("Is aspirin an NSAID?", "", None),
        ("Summarize the abstract.", "", "no input line"),
        ("List the symptoms.", "Fever, cough\nand fatigue were seen.", None),
        ("", "orphan input", "input without its instruction"),
        ("Classify the", "", "cut off at the token limit"),
    ]
    ended = parse_task_list(" Do X now.\n4. Input: y\n\nThat is my list.\n5. Instruction: ignored\n5. Input: z\n")
    assert [(i.instruction, i.input, i.problem) for i in ended] == [("Do X now.", "y", None)]
    off_format = parse_task_list(" Do X now.\n4. Input: y\n5. Rule-based: something else\n")
    assert len(off_format) == 1 and off_format[0].problem is None


def test_first_item_only_stops_at_the_next_item_and_parses_what_is_left(tmp_path: Path) -> None:
    from carve.specialize.generate_instructions import _request
    from carve.specialize.prompts import NEXT_ITEM
    from carve.specialize.seeds import load_seed_set

    seeds = load_seed_set(write_seed_set(tmp_path / "seeds"))
    paper, _ = _request(build_config("paper"), seeds, None, 0, 1, None)
    quick, _ = _request(build_config("quick"), seeds, None, 0, 1, None)
    assert paper.sampling.stop == () and quick.sampling.stop == (NEXT_ITEM,)
    # the engine cuts "...\n5. Instruction:" before the stop string, leaving the next item's number
    for left in (" Name the drug.\n4. Input: Aspirin was given.\n5", " Name the drug.\n5. Input: Aspirin was given.\n 12 "):
        items = parse_task_list(left)
        assert [(i.instruction, i.input, i.problem) for i in items] == [("Name the drug.", "Aspirin was given.", None)]


# -- filters ----------------------------------------------------------------


def test_rouge_l_matches_rouge_score() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("Identify the gene mentioned in the sentence.", "Identify every gene mentioned in this sentence."),
        ("What drug treats diabetes?", "Name the disease in the abstract."),
        ("a b c d e f", "f e d c b a"),
    ]
    for a, b in pairs:
        expected = scorer.score(a, b)["rougeL"].fmeasure
        assert rouge_l(rouge_tokens(b), rouge_tokens(a)) == pytest.approx(expected)


def test_filters_on_hand_made_pairs() -> None:
    settings = FilterSettings(min_instruction_words=3, max_instruction_words=12, max_input_chars=40)
    assert check_pair("Name the gene.", "BRCA1", settings) is None
    assert check_pair("Name it", "", settings)[0] == "length"
    assert check_pair("word " * 13, "", settings)[0] == "length"
    assert check_pair("Name the gene here.", "x" * 41, settings)[0] == "length"
    assert check_pair("Sketch a diagram of the cell.", "", settings) == ("not_text", "asks for 'diagram', which a text model cannot handle")
    assert check_pair("Describe the attached image please.", "", settings)[0] == "not_text"
    assert check_pair("- Name the gene.", "", settings)[0] == "malformed"
    index = DuplicateIndex(0.7)
    index.add("Identify the gene mentioned in the sentence.")
    score, which = index.most_similar("Identify the genes mentioned in the sentence.")
    assert which == 0 and score >= 0.7
    assert index.most_similar("Summarize the abstract in one sentence for a patient.") == (0.0, -1)


def test_filter_state_counts_each_filter() -> None:
    state = FilterState(FilterSettings(max_input_chars=100), DuplicateIndex(0.7), require_input=True)
    state.duplicates.add("Name the gene in the sentence.")  # a seed
    text = (
        " Name the genes in the sentence.\n4. Input: BRCA1 rose.\n"  # near-duplicate of the seed
        "5. Instruction: Plot the survival curve of the cohort.\n5. Input: data\n"  # not_text
        "6. Instruction: Hi\n6. Input: x\n"  # length
        "7. Instruction: Summarize the abstract briefly.\n"  # malformed: no input line
        "8. Instruction: Which drug was given to the patient?\n8. Input: Aspirin was given.\n"  # kept
        "9. Instruction: Which drug was given to the patients?\n9. Input: Aspirin again.\n"  # duplicate of 8
    )
    state.feed({"prompt": 0, "text": text, "finish_reason": "eos"}, "it1", limit=10)
    assert state.counts == {"malformed": 1, "length": 1, "not_text": 1, "near_duplicate": 2, "disfluent": 0}
    assert [k["instruction"] for k in state.kept] == ["Which drug was given to the patient?"]
    assert state.kept[0]["id"] == "it1-00000-4"
    lenient = FilterState(FilterSettings(), DuplicateIndex(0.7), require_input=False)
    lenient.feed({"prompt": 3, "text": " Summarize the abstract briefly.\n", "finish_reason": "eos"}, "it1", limit=10)
    assert [(k["instruction"], k["input"]) for k in lenient.kept] == [("Summarize the abstract briefly.", "")]


def test_disfluent_pairs_are_rejected() -> None:
    # a scorer that finds text with a made-up word unlikely, standing in for the base model
    def scorer(texts: list[str]) -> list[float]:
        return [9.0 if "intranucleotide" in t else 3.0 for t in texts]

    state = FilterState(FilterSettings(), DuplicateIndex(0.7), require_input=True, fluency=(scorer, 5.0))
    text = (
        " Serum intranucleotide contains complex structure twice.\n4. Input: none given here\n"
        "5. Instruction: Which drug was given to the patient?\n5. Input: Aspirin was given.\n"
    )
    state.feed({"prompt": 0, "text": text, "finish_reason": "eos"}, "it1", limit=10)
    assert state.counts["disfluent"] == 1
    assert [k["instruction"] for k in state.kept] == ["Which drug was given to the patient?"]
    assert "9.00 > 5.00" in state.rejected[0]["reason"]


def test_degenerate_responses() -> None:
    assert degenerate_response("   ") == ("empty", "empty response")
    loop = "The correct answer is: " * 6
    assert degenerate_response(loop)[0] == "repetitive"
    entities = "C9 deficiency <Disease>, breast cancer <Disease>, ataxia telangiectasia <Disease>, Wilms tumour <Disease>"
    assert degenerate_response(entities) is None
    assert degenerate_response("Yes") is None
    sentence = "The gene encoding the enzyme of the malaria parasite has been identified."
    assert degenerate_response(sentence, sentence, "")[0] == "echo"
    assert degenerate_response("It restates: " + sentence, "Summarize.", sentence)[0] == "echo"
    assert degenerate_response("BRCA1 <Gene>", "Tag the genes.", "Expression of BRCA1 rose in tumours of the breast.") is None
    # only the named checks apply (the paper profile drops empty responses and nothing else)
    assert degenerate_response(sentence, sentence, "", checks=("empty",)) is None
    assert degenerate_response(loop, checks=("empty", "echo")) is None
    assert degenerate_response(" ", checks=("empty",))[0] == "empty"
    # markup no seed answer has (gemma3's "<tex>$16$</tex>"), while entity tags and dollar amounts pass
    assert degenerate_response("HPV 16 <tex>$16$</tex>")[0] == "markup"
    assert degenerate_response("Meth mouth <tex>>> xerostomia")[0] == "markup"
    assert degenerate_response("IgG2b <b>bold</b>")[0] == "markup"
    assert degenerate_response("revenue rose from $5M to $6M") is None
    from carve.specialize.seeds import load_seed_set

    seeds_root = Path(__file__).resolve().parent.parent / "seeds"
    for domain in ("biomedical", "finance"):
        assert all(degenerate_response(s.output, checks=("markup",)) is None for s in load_seed_set(seeds_root / domain).seeds)


def test_training_set_holds_the_kept_responses_and_the_seeds_only_if_asked(tmp_path: Path) -> None:
    from specialize_tiny import SEEDS

    from carve.specialize.run import TRAINING_SET, _training_examples
    from carve.specialize.seeds import load_seed_set

    seed_set = load_seed_set(write_seed_set(tmp_path / "seeds"))
    sentence = "The gene encoding the enzyme of the malaria parasite has been identified."
    responses = [
        {"id": "a", "instruction": "Tag the genes.", "input": "BRCA1 rose.", "output": "BRCA1 <Gene>"},
        {"id": "b", "instruction": sentence, "input": "", "output": sentence},
    ]
    for train_on_seeds, seed_rows in ((False, 0), (True, 2 * len(SEEDS))):
        config = build_config("quick", train_on_seeds=train_on_seeds)
        examples, removed = _training_examples(responses, {}, seed_set, config, tmp_path)
        assert [e["id"] for e in examples[:1]] == ["a"] and removed["echo"] == 1
        assert [e["source"] for e in examples[1:]] == ["seed"] * seed_rows
        assert [json.loads(line)["id"] for line in (tmp_path / TRAINING_SET).read_text().splitlines()] == [e["id"] for e in examples]


def test_response_read_out_of_a_retrieved_document_is_copied() -> None:
    document = (
        "Short-term memory and sentence comprehension. The relationship between short-term memory impairment and "
        "sentence comprehension is explored in a right-handed patient with a focal temporoparietal lesion of the right hemisphere."
    )
    read_out = "The relationship between short-term memory impairment and sentence comprehension is explored in a right-handed patient"
    verdict = degenerate_response(read_out, "Split the sentence into two sentences.", "", ["An unrelated abstract about kidneys.", document])
    assert verdict is not None and verdict[0] == "copied" and "document 2" in verdict[1]
    # an answer drawn from the document but short, or long and in its own words, is kept
    assert degenerate_response("a focal temporoparietal lesion", "Where is the lesion?", "", [document]) is None
    own_words = "The patient had a lesion on the right side of the brain, which impaired memory and, through it, how well long sentences were understood."
    assert degenerate_response(own_words, "Summarize the case.", "", [document]) is None


def test_fluency_limit_is_the_least_fluent_seed_plus_margin() -> None:
    assert fluency_limit([3.0, 4.5, math.inf], 0.5) == 5.0
    with pytest.raises(ValueError):
        fluency_limit([math.inf], 0.0)
    assert pair_text(" Name the gene. ", "") == "Name the gene."


# -- retrieval weights -------------------------------------------------------


def test_marginalization_weights_are_softmax_of_bm25_scores(tmp_path: Path) -> None:
    assert softmax([2.0, 1.0, 0.0]) == pytest.approx([math.e**2 / (math.e**2 + math.e + 1), math.e / (math.e**2 + math.e + 1), 1 / (math.e**2 + math.e + 1)])
    assert softmax([1000.0, 1000.0]) == [0.5, 0.5]
    corpus = load_corpus(write_corpus(tmp_path / "c.jsonl"))
    index = BM25Index.open(corpus, tmp_path / "cache")
    hits = index.search(["BRCA1 expression in breast cancer tissue"], 3)[0]
    assert corpus.documents[hits[0][0]].id == "d2"
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]
    expected = [math.exp(s - scores[0]) for s in scores]
    assert softmax(scores) == pytest.approx([e / sum(expected) for e in expected])
    # the index is cached by corpus content and reused
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "carve-index.json").is_file()
    assert BM25Index.open(corpus, tmp_path / "cache").search(["BRCA1 expression in breast cancer tissue"], 3)[0] == hits


def test_corpus_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"id": "b"}\nnot json\n{"id": "a", "text": "again"}\n{"id": 3, "text": "x"}\n')
    with pytest.raises(CorpusError) as error:
        load_corpus(path)
    problems = error.value.problems
    assert "bad.jsonl line 2: field 'text': is required" in problems
    assert any(p.startswith("bad.jsonl line 3: invalid JSON") for p in problems)
    assert "bad.jsonl line 4: field 'id': duplicate id 'a' (first on line 1)" in problems
    assert any(p.startswith("bad.jsonl line 5: field 'id'") for p in problems)


# -- store and config ---------------------------------------------------------


def test_store_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": "b", "v": 2}\n{"id": "c", "v"')
    store = JsonlStore(path)
    assert list(store.items) == ["a", "b"]
    assert path.read_text() == '{"id": "a", "v": 1}\n{"id": "b", "v": 2}\n'
    store.append([{"id": "b", "v": 9}, {"id": "c", "v": 3}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_profiles() -> None:
    paper, quick = build_config("paper"), build_config("quick")
    assert (paper.num_instructions, paper.top_k, paper.training.epochs, paper.training.batch_size) == (5000, 5, 3, 32)
    assert (paper.instruction_top_p, paper.instruction_temperature, paper.training.learning_rate) == (0.98, 1.0, 3e-4)
    assert paper.training.accumulation == 8 and not paper.train_on_seeds and paper.fluency_margin is None and not paper.first_item_only
    # quick: fewer synthetic pairs, one per prompt, the seeds train too, and the small-generator fixes
    assert paper.response_filters == ("empty",) and set(quick.response_filters) == {"empty", "repetitive", "echo", "copied", "markup"}
    assert quick.num_instructions == 120 and quick.first_item_only and quick.fluency_margin == 0.0
    assert (quick.instruction_temperature, quick.instruction_top_p) == (0.7, 0.9)
    assert quick.seed_demonstrations == 2 and paper.seed_demonstrations == 0 and quick.training.max_length == 512
    # quick: the seeds train first (stage 0); that adapter writes the responses and stage 4 continues it
    assert (quick.respond_with, quick.train_from, quick.train_on_seeds) == ("seed_adapter", "seed_adapter", False) and quick.uses_seed_adapter()
    assert (paper.respond_with, paper.train_from) == ("base", "scratch") and not paper.uses_seed_adapter()
    # ... at the paper's rate, not quick's fresh-LoRA rate: the continuation keeps what the seeds taught
    assert (quick.training.rate(continuing=False), quick.training.rate(continuing=True)) == (1e-3, 3e-4)
    assert paper.training.continue_learning_rate is None and paper.training.rate(continuing=True) == 3e-4
    assert build_config("paper", train_from="seed_adapter").uses_seed_adapter()
    with pytest.raises(ValueError, match="seed_demonstrations needs train_on_seeds or a seed adapter"):
        build_config("paper", seed_demonstrations=2)
    assert build_config("paper", seed_demonstrations=2, train_on_seeds=True).seed_demonstrations == 2
    assert build_config("quick", top_k=5, training={"epochs": 3}).training.epochs == 3
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        build_config("paper", training={"micro_batch_size": 5})


# -- bad input leaves no run folder -------------------------------------------


def test_bad_seeds_or_corpus_create_no_run_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    seeds = write_seed_set(tmp_path / "seeds")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = build_config("quick", base=str(tiny_model_dir))
    bad_seeds = tmp_path / "bad-seeds"
    write_seed_set(bad_seeds)
    (bad_seeds / "seeds.jsonl").write_text('{"instruction": "x", "output": ""}\n')
    with pytest.raises(SeedSetError, match="seeds.jsonl line 1: field 'output': must not be empty"):
        prepare(config, bad_seeds, corpus, tmp_path / "run1", resume=False)
    bad_corpus = tmp_path / "bad.jsonl"
    bad_corpus.write_text('{"id": "a", "title": "t"}\n')
    with pytest.raises(CorpusError, match="line 1: field 'text': is required"):
        prepare(config, seeds, bad_corpus, tmp_path / "run2", resume=False)
    with pytest.raises(RunError, match="corpus is needed"):
        prepare(config, seeds, None, tmp_path / "run3", resume=False)
    from carve.evaluation.suite import SuiteError

    with pytest.raises(SuiteError, match="no such folder or file"):
        prepare(config, seeds, corpus, tmp_path / "run4", resume=False, eval_tasks=tmp_path / "missing-tasks")
    assert not any((tmp_path / f"run{i}").exists() for i in (1, 2, 3, 4))


def test_cli_reports_bad_corpus_and_creates_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    from typer.testing import CliRunner

    from carve.cli.app import app

    seeds = write_seed_set(tmp_path / "seeds")
    bad_corpus = tmp_path / "bad.jsonl"
    bad_corpus.write_text("{broken\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["specialize", str(seeds), "--corpus", str(bad_corpus), "--out", str(out), "--base", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert "bad.jsonl line 1: invalid JSON" in result.output
    assert not out.exists()


def test_mean_nll_is_the_per_token_loss_and_independent_of_company(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    import torch

    from carve.engine.loading import open_engine

    engine, _, _ = open_engine(str(tiny_model_dir), [("alpha", tiny_adapters["alpha"])])
    texts = ["Name the gene in the sentence.", "Which drug was given to the patient today?"]
    together = engine_scorer(engine)(texts)
    assert together == [engine_scorer(engine)([t])[0] for t in texts]
    ids = torch.tensor([engine.tokenizer(texts[1], add_special_tokens=False)["input_ids"]])
    with engine.model.disable_adapter(), torch.inference_mode():  # the base, not the loaded adapter
        logprobs = torch.log_softmax(engine.model(input_ids=ids).logits[0, :-1].float(), -1)
    expected = -logprobs.gather(1, ids[0, 1:, None]).mean().item()
    assert together[1] == pytest.approx(expected, abs=1e-4)
    assert mean_nll(engine.model, engine.tokenizer, [""]) == [math.inf]
