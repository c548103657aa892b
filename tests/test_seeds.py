"""Seed sets: the loader's contract, the shipped sets, and the shipped data samples."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from carve.specialize.seeds import (
    MIN_SEEDS,
    Seed,
    SeedSetError,
    load_seed_set,
    parse_domain,
    parse_seed_lines,
    write_seed_set,
)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "seeds"
DATA = ROOT / "data"
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="full shared data not present (user clone)")
_TAGGED = re.compile(r"(.+?) <([^<>]+)>(?:, |$)")
NER_TASKS = {
    "anatem", "bc2gm", "bc5cdr", "bionlp09", "bionlp11epi", "bionlp11id", "bionlp13cg",
    "bionlp13ge", "bionlp13pc", "craft", "ex_ptm", "linnaeus", "ncbi_disease", "fin_ner",
}
DOMAIN = {"name": "Test", "tag": "test-domain", "description": "testing"}


def _seed(i: int, **extra: object) -> dict:
    return {"instruction": f"Do task number {i}.", "input": f"text {i}", "output": f"answer {i}", **extra}


def _write_set(folder: Path, lines: list[str], domain: dict | str = DOMAIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = domain if isinstance(domain, str) else json.dumps(domain)
    (folder / "domain.json").write_text(text, encoding="utf-8")
    (folder / "seeds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _import_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the shipped seed sets -------------------------------------------------------------------


def test_biomedical_set_meets_the_paper_counts() -> None:
    seed_set = load_seed_set(SEEDS / "biomedical")
    tasks = seed_set.tasks()
    assert seed_set.domain.tag == "biomedical"
    assert seed_set.domain.name == "biomedical"  # the paper's prompt: "... about a biomedical domain"
    assert len(seed_set.seeds) >= 80
    assert len(tasks) >= 16
    assert max(tasks.values()) <= 5
    assert "" not in tasks, "every shipped seed names its task"
    assert sum(tasks.values()) == len(seed_set.seeds)


def test_finance_set_loads() -> None:
    seed_set = load_seed_set(SEEDS / "finance")
    assert seed_set.domain.tag == "finance"
    assert len(seed_set.seeds) >= 20
    assert set(seed_set.tasks()) == {"fin_ner", "fpb_sentiment"}


@pytest.mark.parametrize("tag", ["biomedical", "finance"])
def test_shipped_sets_carry_attribution_and_ids(tag: str) -> None:
    folder = SEEDS / tag
    seed_set = load_seed_set(folder)
    ids = (folder / "SOURCE_IDS.txt").read_text(encoding="utf-8").split()
    assert len(ids) == len(seed_set.seeds) == len(set(ids))
    attribution = (folder / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "licence" in attribution.lower()


@pytest.mark.parametrize("tag", ["biomedical", "finance"])
def test_shipped_entity_seeds_are_supported_by_their_input(tag: str) -> None:
    """An NER seed must not teach an entity that its text does not contain."""
    for seed in load_seed_set(SEEDS / tag).seeds:
        if seed.task in NER_TASKS:
            mentions = _TAGGED.findall(seed.output)
            assert mentions and ", ".join(f"{m} <{t}>" for m, t in mentions) == seed.output
            for mention, _type in mentions:
                assert mention.lower() in seed.input.lower(), (seed.task, mention)


def test_loading_from_the_jsonl_path_gives_the_same_set() -> None:
    by_folder = load_seed_set(SEEDS / "finance")
    by_file = load_seed_set(SEEDS / "finance" / "seeds.jsonl")
    assert by_file.content_hash == by_folder.content_hash
    assert by_file.path == by_folder.path


@needs_shared
def test_instructions_are_written_here_not_copied_from_box() -> None:
    """Same task as the BoX definition, different words (ROUGE-L under self-instruct's 0.7)."""
    from rouge_score import rouge_scorer

    box = json.loads((SHARED / "biomed" / "tasks.json").read_text(encoding="utf-8"))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    instructions = {s.task: s.instruction for s in load_seed_set(SEEDS / "biomedical").seeds}
    for task, instruction in instructions.items():
        definition = box[task]["instruction"]
        assert instruction != definition
        assert scorer.score(definition, instruction)["rougeL"].fmeasure < 0.7, task


@needs_shared
@pytest.mark.parametrize("tag", ["biomedical", "finance"])
def test_shipped_sets_are_what_the_script_builds(tag: str) -> None:
    """The committed seeds are reproducible from the pool: nobody hand-edited one line."""
    script = _import_script(SEEDS / "make_seeds.py")
    seeds, ids = script.build(SHARED, tag)
    shipped = load_seed_set(SEEDS / tag)
    assert [Seed.model_validate(s) for s in seeds] == shipped.seeds
    assert shipped.domain.model_dump() == script.DOMAINS[tag]["domain"]
    assert ids == (SEEDS / tag / "SOURCE_IDS.txt").read_text(encoding="utf-8").split()
    pool_inputs = {json.loads(line)["input"] for f in SHARED.glob("*/seedpool/*.jsonl") for line in f.open()}
    assert all(s["input"] in pool_inputs for s in seeds)


# --- the loader's contract -------------------------------------------------------------------


def test_bad_set_reports_every_problem_with_file_line_field(tmp_path: Path) -> None:
    lines = [
        json.dumps(_seed(1, task="t")),  # 1 ok
        '{"instruction": "broken", "output": ',  # 2 invalid JSON
        json.dumps({"input": "x", "output": "y"}),  # 3 missing instruction
        "",  # 4 blank: ignored
        json.dumps(_seed(5) | {"output": "   "}),  # 5 empty output
        json.dumps(_seed(6, source="pubmed")),  # 6 unknown field
        json.dumps(_seed(1) | {"output": "another answer"}),  # 7 duplicate of line 1 (instruction+input)
        json.dumps(_seed(8) | {"output": 42}),  # 8 output not a string
        json.dumps(["not", "an", "object"]),  # 9 not an object
        json.dumps(_seed(10)),  # 10 ok
        json.dumps(_seed(11)),  # 11 ok
    ]
    folder = _write_set(tmp_path / "bad", lines)
    before = _snapshot(folder)

    with pytest.raises(SeedSetError) as caught:
        load_seed_set(folder)
    problems = caught.value.problems
    expected = [
        ("seeds.jsonl line 2:", "invalid JSON"),
        ("seeds.jsonl line 3: field 'instruction':", "is required"),
        ("seeds.jsonl line 5: field 'output':", "must not be empty"),
        ("seeds.jsonl line 6: field 'source':", "unknown field"),
        ("seeds.jsonl line 7: field 'instruction'+'input':", "duplicate of line 1"),
        ("seeds.jsonl line 8: field 'output':", "must be a string"),
        ("seeds.jsonl line 9:", "expected a JSON object"),
    ]
    assert len(problems) == len(expected), problems
    for problem, (where, why) in zip(problems, expected):
        assert problem.startswith(where) and why in problem, problem
    message = str(caught.value)
    assert all(p in message for p in problems)
    assert _snapshot(folder) == before, "loading must not write"


def test_parse_seed_lines_names_the_upload(tmp_path: Path) -> None:
    good = [json.dumps(_seed(i)) for i in range(3)]
    seeds = parse_seed_lines("\n\n".join(good), source="upload.jsonl")
    assert [s.output for s in seeds] == ["answer 0", "answer 1", "answer 2"]
    with pytest.raises(SeedSetError) as caught:
        parse_seed_lines("\n".join([*good, json.dumps(_seed(9, output=""))]), source="upload.jsonl")
    assert caught.value.problems == ["upload.jsonl line 4: field 'output': must not be empty"]


def test_duplicates_ignore_case_and_spacing() -> None:
    lines = [json.dumps(_seed(i)) for i in range(3)]
    lines.append(json.dumps({"instruction": "do  TASK number 0. ", "input": "Text 0", "output": "other"}))
    with pytest.raises(SeedSetError, match="line 4: field 'instruction'\\+'input': duplicate of line 1"):
        parse_seed_lines("\n".join(lines))


def test_fewer_than_three_seeds_refused(tmp_path: Path) -> None:
    folder = _write_set(tmp_path / "small", [json.dumps(_seed(i)) for i in range(MIN_SEEDS - 1)])
    with pytest.raises(SeedSetError, match=f"2 seeds, at least {MIN_SEEDS} are needed"):
        load_seed_set(folder)
    ok = _write_set(tmp_path / "enough", [json.dumps(_seed(i)) for i in range(MIN_SEEDS)])
    assert len(load_seed_set(ok).seeds) == MIN_SEEDS


@pytest.mark.parametrize("tag", ["../escape", "has space", "", "-leading", "a" * 65, 7])
def test_domain_with_a_bad_tag_is_refused(tmp_path: Path, tag: object) -> None:
    folder = _write_set(tmp_path / "d", [json.dumps(_seed(i)) for i in range(3)], DOMAIN | {"tag": tag})
    with pytest.raises(SeedSetError) as caught:
        load_seed_set(folder)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("domain.json: field 'tag':")


def test_domain_and_seed_problems_are_reported_together(tmp_path: Path) -> None:
    domain = {"name": "X", "tag": "ok", "description": " ", "owner": "me"}
    lines = [json.dumps(_seed(i)) for i in range(3)] + ['{"instruction": "x", "output": ""}']
    folder = _write_set(tmp_path / "both", lines, domain)
    with pytest.raises(SeedSetError) as caught:
        load_seed_set(folder)
    problems = caught.value.problems
    assert any(p.startswith("domain.json: field 'description': must not be empty") for p in problems)
    assert any(p.startswith("domain.json: field 'owner': unknown field") for p in problems)
    assert any(p.startswith("seeds.jsonl line 4: field 'output'") for p in problems)


@pytest.mark.parametrize(
    ("domain_text", "expected"),
    [("{not json", "domain.json line 1: invalid JSON"), ("[1, 2]", "domain.json: expected a JSON object")],
)
def test_unreadable_domain_file(tmp_path: Path, domain_text: str, expected: str) -> None:
    folder = _write_set(tmp_path / "d", [json.dumps(_seed(i)) for i in range(3)], domain_text)
    with pytest.raises(SeedSetError, match=re.escape(expected)):
        load_seed_set(folder)


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(SeedSetError, match="no such seed set"):
        load_seed_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeedSetError) as caught:
        load_seed_set(tmp_path / "empty")
    assert len(caught.value.problems) == 2  # domain.json and seeds.jsonl both named
    assert "domain.json: missing" in caught.value.problems[0]
    assert "seeds.jsonl: missing" in caught.value.problems[1]
    assert list((tmp_path / "empty").iterdir()) == []


def test_content_hash_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    records = [_seed(i, task="t") for i in range(4)]
    first = load_seed_set(_write_set(tmp_path / "a", [json.dumps(r) for r in records]))
    # Another folder, other key order, other spacing, blank lines: same content, same hash.
    reordered = ["", *(json.dumps(dict(reversed(list(r.items()))), indent=None, separators=(" ,", " : ")) for r in records), ""]
    second = load_seed_set(_write_set(tmp_path / "b", reordered, json.dumps(DOMAIN, indent=4)))
    assert first.content_hash == second.content_hash
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first.content_hash)
    assert first.content_hash == load_seed_set(tmp_path / "a").content_hash

    changed_output = [*records[:3], records[3] | {"output": "answer 3!"}]
    changed_order = [records[1], records[0], *records[2:]]
    changed_task = [*records[:3], records[3] | {"task": "u"}]
    hashes = {first.content_hash}
    for i, variant in enumerate([changed_output, changed_order, changed_task]):
        hashes.add(load_seed_set(_write_set(tmp_path / f"v{i}", [json.dumps(r) for r in variant])).content_hash)
    other_domain = DOMAIN | {"description": "other"}
    hashes.add(load_seed_set(_write_set(tmp_path / "d", [json.dumps(r) for r in records], other_domain)).content_hash)
    assert len(hashes) == 5


def test_write_seed_set_round_trips_and_never_overwrites(tmp_path: Path) -> None:
    shipped = load_seed_set(SEEDS / "finance")
    stored = write_seed_set(tmp_path / "runs" / "finance-seeds", shipped.domain, shipped.seeds)
    assert stored.content_hash == shipped.content_hash
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["finance-seeds"]  # no staging left
    with pytest.raises(SeedSetError, match="already exists"):
        write_seed_set(tmp_path / "runs" / "finance-seeds", shipped.domain, shipped.seeds[:5])
    assert load_seed_set(tmp_path / "runs" / "finance-seeds").content_hash == shipped.content_hash
    with pytest.raises(SeedSetError, match="at least 3"):
        write_seed_set(tmp_path / "runs" / "too-small", shipped.domain, shipped.seeds[:2])
    with pytest.raises(SeedSetError, match="duplicate of line 1"):
        write_seed_set(tmp_path / "runs" / "dupes", shipped.domain, [shipped.seeds[0]] * 3)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["finance-seeds"]


def test_parse_domain_for_uploads() -> None:
    assert parse_domain(DOMAIN).tag == "test-domain"
    with pytest.raises(SeedSetError) as caught:
        parse_domain({"name": "x", "tag": "a/b"}, source="request body")
    assert [p.split(":")[0:2] for p in caught.value.problems] == [
        ["request body", " field 'tag'"],
        ["request body", " field 'description'"],
    ]


def test_seed_model_refuses_extras_and_blank_text() -> None:
    assert Seed(instruction="i", output="o").input == ""
    for bad in ({"instruction": "i", "output": "o", "extra": 1}, {"instruction": "\t", "output": "o"}, {"instruction": "i"}):
        with pytest.raises(ValueError):
            Seed.model_validate(bad)


def test_importing_the_loader_does_not_import_torch() -> None:
    code = "import sys, carve.specialize.seeds; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- the shipped data samples ----------------------------------------------------------------


def test_data_samples_stay_small() -> None:
    files = [p for p in DATA.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    assert all(p.stat().st_size < 1_900_000 for p in files)


def test_corpus_sample_format() -> None:
    lines = (DATA / "corpus" / "pubmed_sample.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines]
    assert len(docs) > 1000
    assert all(set(d) == {"id", "title", "text"} and d["text"].strip() for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)


@pytest.mark.parametrize(("domain", "tasks"), [("biomed", 9), ("finance", 2)])
def test_eval_samples_format(domain: str, tasks: int) -> None:
    files = sorted((DATA / "eval" / domain).glob("*.jsonl"))
    assert len(files) == tasks
    seed_inputs = {s.input for tag in ("biomedical", "finance") for s in load_seed_set(SEEDS / tag).seeds}
    for path in files:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == 12, path
        for row in rows:
            assert set(row) == {"id", "task", "instruction", "input", "output", "answers"}
            assert row["task"] == path.stem and row["output"] in row["answers"]
            assert row["input"] not in seed_inputs, "an evaluation example is also a seed"


@needs_shared
def test_samples_regenerate_identically() -> None:
    script = _import_script(DATA / "make_samples.py")
    committed = (DATA / "corpus" / "pubmed_sample.jsonl").read_text(encoding="utf-8").splitlines()
    assert script.sample_corpus(SHARED / "corpus" / "pubmed_abstracts.jsonl") == committed
    for domain, dev in script.DOMAINS.items():
        for source in sorted((SHARED / dev).glob("*.jsonl")):
            shipped = (DATA / "eval" / domain / source.name).read_text(encoding="utf-8").splitlines()
            assert script.sample_task(source) == shipped
