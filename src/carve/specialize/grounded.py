"""Stage 1-3 alternative (``instances: corpus``): task instances whose input is a real corpus sentence.

A 135M generator writes poor task inputs (issue 16: its generated pairs added
nothing over the seeds alone), while the domain corpus holds real ones. For
every seed task whose inputs are single sentences, the corpus sentences that
BM25 finds closest to that task's seed inputs become new inputs, shaped like
the seeds' (punctuation split off when theirs is). The model then writes only
the easier part, the output: the responder (the seed adapter in the quick
profile) answers each input twice, after two different pairs of the task's own
seeds as demonstrations. An instance is kept when

- both answers agree (compared as the task's answer form reads them), and
- the answer has the seeds' form: for tagged answers (``mention <Type>, ...``)
  every mention occurs in the input and every type is one the task's seeds
  use; for label answers every label is named by the instruction or a seed.

Tasks whose inputs have parts (``Context: ... Question: ...``) get no
instances: a corpus sentence cannot stand in for them. Every choice is
deterministic (BM25 ranks, greedy decoding), so a resumed run keeps the same
instances; answers are stored as they are written and resume by id.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from carve.common.progress import stage
from carve.specialize.config import RunConfig
from carve.specialize.retrieval import BM25Index, Corpus, Document
from carve.specialize.seeds import Seed, SeedSet
from carve.specialize.store import JsonlStore, write_jsonl_atomic

INSTANCES = "corpus_instances.jsonl"
ANSWERS = "corpus_answers.jsonl"
REJECTED_INSTANCES = "rejected_instances.jsonl"
GROUNDED_FILTERS = ("empty", "disagree", "not_in_input", "unknown_type", "unknown_label")

AnswerForm = Literal["tagged", "label", "free"]
_PARTS_INPUT = re.compile(r"^\s*[A-Z][A-Za-z]*\d*: ", re.MULTILINE)  # "Context: ...", "Context1: ...", "Question: ..."
_SPACED_PUNCTUATION = re.compile(r"\s[.,;:)\]]")
_SPLIT_ALWAYS, _SPLIT_IF_SEEN = ".,;:()[]", "-/"  # hyphens and slashes only when the seeds split them ("caspase - dependent")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[])")
_TAGGED_ITEM = r"[^<>,]+?\s*<[^<>,]+>"
_TAGGED = re.compile(rf"\s*{_TAGGED_ITEM}(?:\s*,\s*{_TAGGED_ITEM})*\s*")
_TAG = re.compile(r"\s*([^<>,]+?)\s*<([^<>,]+)>\s*(?:,|$)")
MIN_WORDS, MAX_WORDS = 6, 200


@dataclass(frozen=True)
class TaskShape:
    """What a seed task's inputs and answers look like, read from its seeds."""

    name: str
    instruction: str
    seeds: tuple[Seed, ...]
    split_punctuation: str  # the characters the seeds' inputs set apart with spaces ("" when they are plain text)
    max_words: int  # an input is at most as long as the task's longest seed input, and a half more
    form: AnswerForm
    types: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()


def tagged_items(text: str) -> list[tuple[str, str]] | None:
    """``mention <Type>, ...`` as (mention, type) pairs; None when the text is not in that form."""
    if not _TAGGED.fullmatch(text):
        return None
    return [(m.group(1), m.group(2)) for m in _TAG.finditer(text)]


def _labels(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def task_shapes(seed_set: SeedSet) -> tuple[list[TaskShape], dict[str, str]]:
    """The sentence-input tasks of a seed set, and why each other task got none."""
    groups: dict[str, list[Seed]] = {}
    for seed in seed_set.seeds:
        groups.setdefault(seed.task or seed.instruction, []).append(seed)
    shapes: list[TaskShape] = []
    skipped: dict[str, str] = {}
    for name, seeds in groups.items():
        inputs = [s.input for s in seeds]
        if not all(i.strip() for i in inputs):
            skipped[name] = "a seed has no input"
        elif any("\n" in i or _PARTS_INPUT.search(i) for i in inputs):
            skipped[name] = "inputs have parts (lines or 'Context:'-style labels), which a corpus sentence cannot stand in for"
        else:
            shapes.append(_shape(name, seeds))
    return shapes, skipped


def _shape(name: str, seeds: list[Seed]) -> TaskShape:
    instruction = Counter(s.instruction for s in seeds).most_common(1)[0][0]
    split = ""
    if sum(bool(_SPACED_PUNCTUATION.search(s.input)) for s in seeds) * 2 >= len(seeds):
        split = _SPLIT_ALWAYS + "".join(c for c in _SPLIT_IF_SEEN if any(f" {c} " in s.input for s in seeds))
    common = dict(name=name, instruction=instruction, seeds=tuple(seeds), split_punctuation=split, max_words=max(len(s.input.split()) for s in seeds) * 3 // 2)
    tagged = [tagged_items(s.output) for s in seeds]
    if all(items for items in tagged):
        return TaskShape(**common, form="tagged", types=frozenset(t for items in tagged for _, t in items or ()))
    named = " ".join(s.instruction for s in seeds).lower()
    labels = frozenset(label.lower() for s in seeds for label in _labels(s.output))
    if all(label in named for label in labels) and len(labels) < len(seeds) * 2:
        return TaskShape(**common, form="label", labels=labels)
    return TaskShape(**common, form="free")


def shaped(sentence: str, split_punctuation: str) -> str:
    """A corpus sentence written as the task's seed inputs are ("a , b ( c ) ." when theirs are)."""
    text = " ".join(sentence.split())
    if split_punctuation:
        text = " ".join(re.sub(f"\\s*([{re.escape(split_punctuation)}])\\s*", r" \1 ", text).split())
    return text


def corpus_sentences(corpus: Corpus) -> Corpus:
    """Every title and sentence of the corpus with 6-200 words, as a corpus of its own (ids ``<doc>#<n>``)."""
    documents: list[Document] = []
    for doc in corpus.documents:
        pieces = ([doc.title] if doc.title.strip() else []) + _SENTENCE_END.split(doc.text)
        for n, piece in enumerate(pieces):
            if MIN_WORDS <= len(piece.split()) <= MAX_WORDS:
                documents.append(Document(id=f"{doc.id}#{n}", text=" ".join(piece.split())))
    digest = hashlib.sha256(f"{corpus.content_hash}/sentences/{MIN_WORDS}-{MAX_WORDS}".encode()).hexdigest()
    return Corpus(corpus.path, documents, f"sha256:{digest}")


def select_instances(shapes: Sequence[TaskShape], sentences: Corpus, index: BM25Index, per_task: int) -> list[dict[str, Any]]:
    """Up to ``per_task`` inputs per task: the best BM25 hits of its seed inputs, taken in turn."""
    instances: list[dict[str, Any]] = []
    for shape in shapes:
        known = {" ".join(s.input.split()).lower() for s in shape.seeds}
        rankings = index.search([s.input for s in shape.seeds], min(len(sentences.documents), per_task * 4))
        taken: list[str] = []
        seen: set[str] = set()
        for rank in range(max((len(r) for r in rankings), default=0)):
            for ranking in rankings:
                if len(taken) >= per_task or rank >= len(ranking):
                    continue
                document = sentences.documents[ranking[rank][0]]
                text = shaped(document.text, shape.split_punctuation)
                if text.lower() in known or text in seen or len(text.split()) > shape.max_words:
                    continue
                seen.add(text)
                taken.append(document.id)
                instances.append({"id": f"corpus-{shape.name}-{len(taken) - 1:03d}", "task": shape.name, "doc": document.id,
                                  "instruction": shape.instruction, "input": text})
    return instances


def demonstration_views(shape: TaskShape, shots: int) -> list[list[Seed]]:
    """Two disjoint sets of the task's seeds to show before an input (one when it has too few for two)."""
    seeds = list(shape.seeds)
    first, second = seeds[:shots], seeds[shots : 2 * shots]
    return [first, second] if len(second) == len(first) and first else [first]


def _canonical(text: str, shape: TaskShape) -> Any:
    if shape.form == "tagged":
        items = tagged_items(text)
        return sorted(items) if items is not None else ("raw", " ".join(text.split()))
    if shape.form == "label":
        return sorted({label.lower() for label in _labels(text)})
    return " ".join(text.split()).lower()


def judge(answers: Sequence[str], instance: dict[str, Any], shape: TaskShape) -> tuple[str, str] | None:
    """None when the instance is kept, else (filter, reason)."""
    first = answers[0]
    if not first.strip():
        return "empty", "empty answer"
    if any(_canonical(a, shape) != _canonical(first, shape) for a in answers[1:]):
        return "disagree", f"the answers after different demonstrations differ: {[a[:80] for a in answers]}"
    if shape.form == "tagged":
        items = tagged_items(first)
        if items is None:
            return "unknown_type", "not in the seeds' 'mention <Type>, ...' form"
        missing = [m for m, _ in items if m not in instance["input"]]
        if missing:
            return "not_in_input", f"mentions not in the input: {missing[:3]}"
        unknown = sorted({t for _, t in items} - shape.types)
        if unknown:
            return "unknown_type", f"types no seed of the task uses: {unknown[:3]}"
    if shape.form == "label":
        unknown = sorted({label.lower() for label in _labels(first)} - shape.labels)
        named = " ".join(s.instruction for s in shape.seeds).lower()
        if any(label not in named for label in unknown):
            return "unknown_label", f"labels neither the instruction nor a seed names: {unknown[:3]}"
    return None


@dataclass
class GroundedResult:
    kept: list[dict[str, Any]]
    counts: dict[str, int]
    instances: int
    skipped_tasks: dict[str, str]
    per_task: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0


def grounded_instances(
    engine: Any, config: RunConfig, seed_set: SeedSet, corpus: Corpus, folder: Path, cache: Path, adapter: str | None
) -> GroundedResult:
    """Select corpus inputs, have ``adapter`` (None: the base) answer each under every demonstration view, judge them."""
    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.templates import kshot_prompt
    from carve.evaluation.prompts import eval_stop_strings

    shapes, skipped = task_shapes(seed_set)
    by_name = {s.name: s for s in shapes}
    sentences = corpus_sentences(corpus)
    instances = select_instances(shapes, sentences, BM25Index.open(sentences, cache), config.corpus_per_task)
    write_jsonl_atomic(folder / INSTANCES, instances)
    sampling = Sampling(max_new_tokens=config.response_max_new_tokens, temperature=0.0, stop=eval_stop_strings())
    store = JsonlStore(folder / ANSWERS)
    missing = [item for item in instances if item["id"] not in store]
    with stage("responses to corpus inputs", len(instances), "inputs") as progress:
        progress.resumed(len(instances) - len(missing))
        for start in range(0, len(missing), config.response_batch):
            chunk = missing[start : start + config.response_batch]
            views = [demonstration_views(by_name[item["task"]], config.corpus_shots) for item in chunk]
            requests = [
                GenerationRequest.single(kshot_prompt(view, item["instruction"], item["input"]), adapter, sampling)
                for item, item_views in zip(chunk, views) for view in item_views
            ]
            completions = iter(engine.generate(requests))
            records = []
            for item, item_views in zip(chunk, views):
                answers = [next(completions) for _ in item_views]
                records.append({"id": item["id"], "answers": [c.text.strip() for c in answers], "tokens": sum(len(c.token_ids) for c in answers)})
            store.append(records)
            progress.advance(len(chunk))
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    counts = {name: 0 for name in GROUNDED_FILTERS}
    for item in instances:
        shape, answers = by_name[item["task"]], store.items[item["id"]]["answers"]
        verdict = judge(answers, item, shape)
        if verdict is None:
            demos = [{"instruction": d.instruction, "input": d.input, "output": d.output} for d in demonstration_views(shape, config.corpus_shots)[0]]
            kept.append({**item, "source": "corpus", "output": answers[0], "demos": demos})
        else:
            counts[verdict[0]] += 1
            rejected.append({**item, "answers": answers, "filter": verdict[0], "reason": verdict[1]})
    write_jsonl_atomic(folder / REJECTED_INSTANCES, rejected)
    per_task = Counter(item["task"] for item in kept)
    tokens = sum(store.items[item["id"]]["tokens"] for item in instances)
    return GroundedResult(kept, counts, len(instances), skipped, dict(per_task), tokens)


def training_examples(kept: Sequence[dict[str, Any]], with_demonstrations: bool) -> list[dict[str, Any]]:
    """Each kept instance alone and, as the seeds train (``seed_demonstrations``), after its first view's demonstrations."""
    examples: list[dict[str, Any]] = []
    for item in kept:
        alone = {k: item[k] for k in ("id", "source", "task", "doc", "instruction", "input", "output")}
        examples.append(alone)
        if with_demonstrations and item["demos"]:
            examples.append({**alone, "id": f"{item['id']}-k{len(item['demos'])}", "demos": item["demos"]})
    return examples
