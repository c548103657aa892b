"""carve eval: suites, k-shot prompts that fit the context, and a full run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carve.engine.templates import STOP_STRINGS, alpaca_example, alpaca_prompt, kshot_prompt
from carve.evaluation.metrics import score_prediction
from carve.evaluation.prompts import PromptError, PromptFitter, eval_stop_strings, pick_demos
from carve.evaluation.suite import EvalExample, SuiteError, load_suite
from carve.specialize.seeds import load_seed_set

QA = "Answer the question with yes or no."
NER = "Name the disease entities. Generate the output in this format: entity1 <type_of_entity1>."
LONG_INPUT = " ".join(["Gene expression of BRCA1 was measured in breast cancer tissue samples."] * 40)


def example(id: str, task: str, instruction: str, input: str, answers: list[str]) -> dict:
    return {"id": id, "task": task, "instruction": instruction, "input": input, "output": answers[0], "answers": answers}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def suite_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "suite"
    write_jsonl(
        folder / "qa.jsonl",
        [
            example("q1", "qa", QA, "Is metformin used for type 2 diabetes?", ["yes"]),
            example("q2", "qa", QA, "Is aspirin an antibiotic?", ["no"]),
            example("q3", "qa", QA, LONG_INPUT + " Was BRCA1 measured?", ["yes"]),
        ],
    )
    write_jsonl(
        folder / "ner.jsonl",
        [
            example("n1", "ner", NER, "The child had measles .", ["measles <Disease>"]),
            example("n2", "ner", NER, "Heterozygous C9 deficiency was found .", ["C9 deficiency <Disease>", "C9 deficiency"]),
        ],
    )
    return folder


@pytest.fixture()
def seed_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "seeds"
    (folder).mkdir()
    (folder / "domain.json").write_text(json.dumps({"name": "Biomedicine", "tag": "bio", "description": "biomedical"}))
    seeds = [
        {"instruction": QA, "input": "Is insulin a hormone?", "output": "yes", "task": "qa"},
        {"instruction": NER, "input": "She had influenza .", "output": "influenza <Disease>", "task": "ner"},
        {"instruction": QA, "input": "Is DNA a protein?", "output": "no", "task": "qa"},
        {"instruction": "Classify the sentiment.", "input": "Revenue rose 12 percent.", "output": "positive", "task": "sentiment"},
    ]
    write_jsonl(folder / "seeds.jsonl", seeds)
    return folder


# -- suites -------------------------------------------------------------------


def test_load_suite_groups_by_task(suite_dir: Path) -> None:
    suites = load_suite(suite_dir)
    assert [s.task for s in suites] == ["ner", "qa"]
    assert [e.id for e in suites[1].examples] == ["q1", "q2", "q3"]
    assert suites[0].examples[1].answers == ["C9 deficiency <Disease>", "C9 deficiency"]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"id": "x", "task": "qa", "instruction": QA, "input": "?", "output": "yes"}, "line 2: field 'answers': is required"),
        ({**example("x", "qa", QA, "?", ["yes"]), "answers": []}, "line 2: field 'answers'"),
        ({**example("x", "qa", QA, "?", ["yes"]), "answers": ["yes", "  "]}, "line 2: field 'answers.1': must not be empty"),
        ({**example("x", "qa", QA, "?", ["yes"]), "instruction": ""}, "line 2: field 'instruction': must not be empty"),
        ({**example("x", "qa", QA, "?", ["yes"]), "input": 3}, "line 2: field 'input'"),
        ({**example("x", "qa", QA, "?", ["yes"]), "answer": "yes"}, "line 2: field 'answer': unknown field"),
        ({**example("q1", "qa", QA, "?", ["yes"])}, "line 2: field 'id': 'q1' repeats line 1"),
        ("not json", "line 2: invalid JSON"),
        (["a", "list"], "line 2: expected a JSON object"),
    ],
)
def test_bad_suite_names_file_line_and_field(tmp_path: Path, line: object, message: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    good = json.dumps(example("q1", "qa", QA, "Is insulin a hormone?", ["yes"]))
    bad = line if isinstance(line, str) else json.dumps(line)
    (folder / "qa.jsonl").write_text(good + "\n" + bad + "\n")
    with pytest.raises(SuiteError) as caught:
        load_suite(folder)
    assert "qa.jsonl" in str(caught.value)
    assert message in str(caught.value)


def test_task_split_over_two_files_is_refused(suite_dir: Path) -> None:
    write_jsonl(suite_dir / "zz.jsonl", [example("x1", "ner", NER, "Flu .", ["flu <Disease>"]), example("q9", "qa", QA, "?", ["no"])])
    with pytest.raises(SuiteError, match=r"zz.jsonl line 1: field 'task': 'ner' is already the task of ner.jsonl"):
        load_suite(suite_dir)


def test_empty_or_missing_suite(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="no .jsonl task files"):
        load_suite(tmp_path)
    with pytest.raises(SuiteError, match="no such folder"):
        load_suite(tmp_path / "nowhere")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SuiteError, match="empty.jsonl: no examples"):
        load_suite(tmp_path)


# -- prompts --------------------------------------------------------------------


def chars() -> dict:
    """A character-level tokenizer: token counts can be checked by hand."""
    return dict(count=len, encode=lambda text: [ord(c) for c in text], decode=lambda ids: "".join(map(chr, ids)))


def query(input: str = "Is metformin used for type 2 diabetes?", task: str = "qa") -> EvalExample:
    return EvalExample(id="q", task=task, instruction=QA, input=input, output="yes", answers=["yes"])


def test_pick_demos_same_task_first_then_domain(seed_dir: Path) -> None:
    seeds = load_seed_set(seed_dir).seeds
    assert [s.input for s in pick_demos(seeds, query(), 2)] == ["Is insulin a hormone?", "Is DNA a protein?"]
    # fewer seeds of the task than k: the domain's other seeds follow, in order
    assert [s.task for s in pick_demos(seeds, query(), 4)] == ["qa", "qa", "ner", "sentiment"]
    assert pick_demos(seeds, query(), 0) == []
    # a seed that is the query itself is never shown
    same = query("Is  insulin a hormone?")
    assert [s.input for s in pick_demos(seeds, same, 1)] == ["Is DNA a protein?"]


def test_prompt_with_k_demos_is_alpaca_examples_then_query(seed_dir: Path) -> None:
    seeds = load_seed_set(seed_dir).seeds
    demos = pick_demos(seeds, query(), 2)
    built = PromptFitter(budget=10_000, **chars()).build(query(), demos)
    expected = (
        alpaca_example(QA, "Is insulin a hormone?", "yes")
        + "\n\n"
        + alpaca_example(QA, "Is DNA a protein?", "no")
        + "\n\n"
        + alpaca_prompt(QA, "Is metformin used for type 2 diabetes?")
    )
    assert built.text == expected
    assert (built.shots_used, built.input_trimmed, built.prompt_tokens) == (2, False, len(expected))
    assert built.text.endswith("### Response:\n")


def test_demos_dropped_last_first_before_the_input_is_cut(seed_dir: Path) -> None:
    seeds = load_seed_set(seed_dir).seeds
    demos = pick_demos(seeds, query(), 2)
    one_demo = kshot_prompt(demos[:1], QA, query().input)
    built = PromptFitter(budget=len(one_demo), **chars()).build(query(), demos)
    assert built.text == one_demo and built.shots_used == 1 and not built.input_trimmed

    bare = kshot_prompt([], QA, query().input)
    built = PromptFitter(budget=len(bare), **chars()).build(query(), demos)
    assert built.text == bare == alpaca_prompt(QA, query().input)
    assert built.shots_used == 0 and not built.input_trimmed


def test_long_input_cut_from_the_end_instruction_kept(seed_dir: Path) -> None:
    seeds = load_seed_set(seed_dir).seeds
    long_query = query(LONG_INPUT)
    budget = len(alpaca_prompt(QA, "x" * 100))  # room for 100 characters of input
    built = PromptFitter(budget=budget, **chars()).build(long_query, pick_demos(seeds, long_query, 5))
    assert built.shots_used == 0 and built.input_trimmed
    assert built.prompt_tokens <= budget
    assert QA in built.text
    kept = built.text.split("### Input:\n")[1].split("\n\n### Response:")[0]
    assert LONG_INPUT.startswith(kept) and 90 <= len(kept) <= 100


def test_instruction_that_cannot_fit_is_an_error() -> None:
    budget = len(alpaca_prompt(QA)) - 1
    with pytest.raises(PromptError, match="instruction alone"):
        PromptFitter(budget=budget, **chars()).build(query(LONG_INPUT), [])


def test_stop_strings_extend_the_templates() -> None:
    stops = eval_stop_strings()
    assert stops[: len(STOP_STRINGS)] == STOP_STRINGS
    # the next demonstration starts with the template's preamble: its first word after a blank line
    # stops a short answer within a few tokens
    assert "\n\nBelow" in stops and alpaca_prompt("i").startswith("Below")
    from carve.specialize.seeds import Seed

    demo = Seed(instruction=QA, input="Is DNA a protein?", output="no", task="qa")
    # exactly what follows a demonstration's answer in a k-shot prompt, so a model imitating it stops
    assert kshot_prompt([demo], QA, "?").split("### Response:\nno", 1)[1].startswith("\n\nBelow")


# -- a run on a tiny model --------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tiny_adapters: dict[str, Path]):
    from carve.engine.loading import open_engine

    engine, _, _ = open_engine(str(tiny_model_dir), [("alpha", tiny_adapters["alpha"]), ("beta", tiny_adapters["beta"])])
    return engine


def test_run_writes_results_predictions_report_chart(engine, suite_dir: Path, seed_dir: Path, tmp_path: Path) -> None:
    from carve.evaluation.run import MACRO, EvalError, EvalReport, evaluate_models

    out = tmp_path / "out"
    models = {"base": None, "alpha": "alpha", "beta": "beta"}
    # A small context (one demo fits, ~330 tokens) so the long example (~1300) loses its demo and has its input cut.
    report = evaluate_models(
        engine, models, suite_dir, [0, 1], load_seed_set(seed_dir), None, out, max_new_tokens=8, batch_size=3, max_context=400, against=["alpha"]
    )

    assert sorted(p.name for p in out.iterdir()) == ["chart.png", "predictions.jsonl", "report.md", "results.json"]
    assert EvalReport.model_validate_json((out / "results.json").read_text()) == report
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == report.generations == 5 * 3 * 2  # examples x models x k
    assert {(r["task"], r["id"], r["model"], r["k"]) for r in rows} == {
        (t, i, m, k) for t, ids in (("qa", ["q1", "q2", "q3"]), ("ner", ["n1", "n2"])) for i in ids for m in models for k in (0, 1)
    }
    for r in rows:  # every saved score is the metric of the saved prediction
        f1, rouge = score_prediction(r["prediction"], r["answers"])
        assert (r["f1"], r["rouge_l"]) == (round(100 * f1, 4), round(100 * rouge, 4))
        assert r["prompt_tokens"] <= 400 - next(t.max_new_tokens for t in report.tasks if t.task == r["task"])
    long = [r for r in rows if r["id"] == "q3"]
    assert all(r["input_trimmed"] and r["shots_used"] == 0 for r in long)
    assert {r["shots_used"] for r in rows if r["k"] == 1 and r["id"] != "q3"} == {1}

    # per-task means and the macro average follow from the predictions
    for score in report.scores:
        mine = [r["f1"] for r in rows if (r["task"], r["model"], r["k"]) == (score.task, score.model, score.k)]
        assert score.n == len(mine) and score.f1 == pytest.approx(sum(mine) / len(mine), abs=1e-3)
    for m in models:
        task_f1 = [report.score(t, m, 1).f1 for t in ("ner", "qa")]
        assert report.score(MACRO, m, 1).f1 == pytest.approx(sum(task_f1) / 2, abs=1e-3)
    # the task's answer budget: its longest answer in tokens plus a margin, capped at max_new_tokens
    assert all(t.max_new_tokens <= 8 for t in report.tasks)

    text = (out / "report.md").read_text()
    assert "## Token F1" in text and "## ROUGE-L" in text and "| k=0 base | k=0 alpha | k=0 beta | k=1 base |" in text
    assert "| qa |" in text and "| **macro average** |" in text and "chart.png" in text
    # each adapter against the base, and beta against alpha (--against), per k and metric, its gain the macro difference of the table
    pairs = {("alpha", "base"), ("beta", "base"), ("beta", "alpha")}
    assert {(g.model, g.baseline, g.k, g.metric) for g in report.gains} == {(m, b, k, x) for m, b in pairs for k in (0, 1) for x in ("f1", "rouge_l")}
    for g in report.gains:
        table_gain = getattr(report.score(MACRO, g.model, g.k), g.metric) - getattr(report.score(MACRO, g.baseline, g.k), g.metric)
        assert g.gain == pytest.approx(table_gain, abs=1e-3) and g.low <= g.gain + 1e-9 and g.gain <= g.high + 1e-9
    assert "## Paired gains" in text and "| alpha | base | 0 |" in text and "| beta | alpha | 1 |" in text
    short = report.summary()
    assert set(short["macro"]) == set(models) and set(short["f1_gain_over_base"]) == {f"{m} k={k}" for m in ("alpha", "beta") for k in (0, 1)}
    assert set(short["f1_gain_over"]) == {"beta vs alpha k=0", "beta vs alpha k=1"}
    with pytest.raises(EvalError, match="--against gamma"):
        evaluate_models(engine, models, suite_dir, [0], None, None, tmp_path / "never", against=["gamma"])
    assert not (tmp_path / "never").exists()

    # Mixed batches change nothing: the base alone, in another run, answers exactly as in the mixed run.
    alone = evaluate_models(engine, {"base": None}, suite_dir, [0, 1], load_seed_set(seed_dir), None, tmp_path / "alone", max_new_tokens=8, batch_size=3, max_context=400)
    base_rows = [r for r in rows if r["model"] == "base"]
    alone_rows = [json.loads(line) for line in (tmp_path / "alone" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in alone_rows] == [r["prediction"] for r in base_rows]
    assert alone.score(MACRO, "base", 0) == report.score(MACRO, "base", 0)


def test_killed_evaluation_resumes_from_its_journal(engine, suite_dir: Path, seed_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carve.evaluation.run import JOURNAL, evaluate_models

    models = {"base": None, "alpha": "alpha"}
    settings = dict(shots=[0, 1], demos=load_seed_set(seed_dir), limit=None, max_new_tokens=6, batch_size=2, max_context=400)
    real_generate = engine.generate
    asked: list[int] = []

    def counting(requests):
        asked.append(len(requests))
        if len(asked) == stop_at:
            raise KeyboardInterrupt  # the process is stopped mid-run
        return real_generate(requests)

    monkeypatch.setattr(engine, "generate", counting)
    stop_at = 0
    evaluate_models(engine, models, suite_dir, out_dir=tmp_path / "whole", **settings)
    whole, whole_rows = (tmp_path / "whole" / "predictions.jsonl").read_text(), sum(asked)

    out = tmp_path / "resumed"
    asked.clear()
    stop_at = 3
    with pytest.raises(KeyboardInterrupt):
        evaluate_models(engine, models, suite_dir, out_dir=out, **settings)
    assert not (out / "results.json").exists()
    journaled = len((out / JOURNAL).read_text().splitlines())
    assert journaled == asked[0] + asked[1] > 0

    asked.clear()
    stop_at = 0
    evaluate_models(engine, models, suite_dir, out_dir=out, **settings)
    assert sum(asked) == whole_rows - journaled  # only what the journal lacked was asked again
    assert (out / "predictions.jsonl").read_text() == whole
    assert not (out / JOURNAL).exists()


def test_run_refuses_before_writing(engine, suite_dir: Path, seed_dir: Path, tmp_path: Path) -> None:
    from carve.evaluation.run import EvalError, evaluate_models

    out = tmp_path / "out"
    with pytest.raises(EvalError, match="needs demonstrations"):
        evaluate_models(engine, {"base": None}, suite_dir, [0, 1], None, None, out)
    with pytest.raises(EvalError, match="not loaded"):
        evaluate_models(engine, {"base": None, "zeta": "zeta"}, suite_dir, [0], None, None, out)
    bad = write_jsonl(tmp_path / "bad" / "qa.jsonl", [{"id": "q1", "task": "qa"}]).parent
    with pytest.raises(SuiteError, match="line 1: field 'instruction'"):
        evaluate_models(engine, {"base": None}, bad, [0], None, None, out)
    assert not out.exists()


def test_cli_eval(tiny_model_dir: Path, tiny_adapters: dict[str, Path], suite_dir: Path, seed_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carve.cli.app import app

    runner = CliRunner()
    out = tmp_path / "cli-out"
    args = ["eval", "--base", str(tiny_model_dir), "--adapter", str(tiny_adapters["gamma"]), "--tasks", str(suite_dir)]
    result = runner.invoke(app, [*args, "--shots", "0", "1", "--demos", str(seed_dir), "--limit", "1", "--max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Token F1" in result.output and "ROUGE-L" in result.output and "gamma" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["models"] == {"base": None, "gamma": "gamma"} and results["shots"] == [0, 1]
    assert [t["examples"] for t in results["tasks"]] == [1, 1]

    bad_dir = tmp_path / "bad-suite"
    write_jsonl(bad_dir / "qa.jsonl", [example("q1", "qa", QA, "?", ["yes"]), {"id": "q2", "task": "qa", "instruction": QA, "output": "no", "answers": "no"}])
    refused = tmp_path / "refused"
    result = runner.invoke(app, [*args[:5], "--tasks", str(bad_dir), "--out", str(refused)])
    assert result.exit_code == 2
    assert "qa.jsonl line 2: field 'answers'" in result.output
    assert not refused.exists()

    result = runner.invoke(app, [*args, "--shots", "0", "five", "--out", str(refused)])
    assert result.exit_code == 2 and "unexpected argument 'five'" in result.output


def test_adapters_by_folder_or_registry_name(tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carve.adapters.registry import Registry
    from carve.cli.evaluate import unique_labels
    from carve.evaluation.run import EvalError

    monkeypatch.setenv("CARVE_REGISTRY", str(tmp_path / "registry"))
    Registry().add(tiny_adapters["beta"], "bio", base=str(tiny_model_dir))
    labels = unique_labels([str(tiny_adapters["alpha"]), "bio", str(tiny_adapters["alpha"])])
    assert [label for label, _ in labels] == ["alpha", "bio", "alpha-2"]
    assert (labels[1][1] / "adapter_config.json").is_file()
    with pytest.raises(EvalError, match="--adapter nope: not a folder, and no adapter"):
        unique_labels(["nope"])


def _prediction(task: str, id: str, model: str, f1: float, k: int = 0):  # type: ignore[no-untyped-def]
    from carve.evaluation.run import Prediction

    return Prediction(task=task, id=id, model=model, k=k, shots_used=k, input_trimmed=False, prompt_tokens=10,
                      prediction="x", finish_reason="eos", answers=["x"], f1=f1, rouge_l=f1)


def test_paired_gain_and_its_bootstrap_interval() -> None:
    from carve.evaluation.compare import paired_gains

    base = [_prediction(t, f"{t}{i}", "base", 10.0 * (i % 3)) for t in ("a", "b") for i in range(30)]
    same = [p.model_copy(update={"model": "same"}) for p in base]
    # +20 on every example of task a, -4 on every example of task b: macro gain +8, task b below the base
    shifted = [p.model_copy(update={"model": "shifted", "f1": p.f1 + (20 if p.task == "a" else -4)}) for p in base]
    gains = {g.model: g for g in paired_gains(base + same + shifted, "base", metrics=("f1",))}
    assert (gains["same"].gain, gains["same"].low, gains["same"].high, gains["same"].tasks_worse) == (0, 0, 0, 0)
    constant = gains["shifted"]
    assert (constant.gain, constant.low, constant.high) == (8, 8, 8)  # a constant paired difference has no spread
    assert (constant.tasks_better, constant.tasks_worse, constant.worst_task, constant.worst_task_gain) == (1, 1, "b", -4)
    # noisy differences: the interval holds the mean and narrows with more examples
    noisy = [p.model_copy(update={"model": "noisy", "f1": p.f1 + (15 if int(p.id[1:]) % 2 else -5)}) for p in base]
    g = paired_gains(base + noisy, "base", metrics=("f1",))[0]
    assert g.gain == 5 and g.low < 5 < g.high and g.high - g.low < 10


def test_label_tasks_get_the_constant_answer_baseline() -> None:
    from carve.evaluation.constant import constant_answer
    from carve.evaluation.suite import EvalExample

    def examples(outputs: list[str]) -> list[EvalExample]:
        return [EvalExample(id=f"e{i}", task="t", instruction="Yes or no?", input="x", output=o, answers=[o]) for i, o in enumerate(outputs)]

    yes_no = constant_answer("t", examples(["yes", "no", "Yes", "yes", "no"]))
    assert yes_no is not None and (yes_no.answer, yes_no.share, yes_no.f1, yes_no.n) == ("yes", 60.0, 60.0, 5)
    assert constant_answer("t", examples(["a long free text answer here", "another one of them", "x", "y"])) is None  # not labels
    assert constant_answer("t", examples(["a", "b", "c"])) is None  # fewer than two examples per label
