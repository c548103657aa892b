"""The paper's evaluation protocol (Table 1): a base model and its adapters, side by side.

Every example of every task is asked, with k = 0, 1, 5 ... demonstrations, of
every model in one pass: each batch holds one row per (example, model), the
base being the row without an adapter, so one forward pass serves all models
(mixed-adapter batches in the engine). Decoding is greedy and the order fixed,
so a run is deterministic. Predictions are scored by token F1 and ROUGE-L
(carve.evaluation.metrics), averaged per task and over tasks (macro), and
written to ``out_dir`` as results.json, predictions.jsonl, report.md and chart.png.

A killed evaluation resumes: every finished batch is appended to
``out_dir/predictions.partial.jsonl``, each prediction keyed by a hash of the
model's identity (its weights fingerprint when the caller gives one), the
exact prompt and the answer budget. A new run in the same folder reuses every
prediction whose key matches, so a different adapter, seed set or prompt is
simply asked again; the journal is removed once the results are written.

``evaluate_models`` is the library entry point: ``carve eval`` and the end of
``carve specialize`` both call it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from carve.engine.decoding import base_model
from carve.engine.text import encode_plain, max_positions
from carve.evaluation.compare import paired_gains
from carve.evaluation.constant import constant_answer
from carve.evaluation.metrics import score_prediction
from carve.evaluation.prompts import BuiltPrompt, Demo, DemoSet, PromptFitter, eval_stop_strings, pick_demos
from carve.evaluation.report import write_outputs
from carve.evaluation.schema import BASE_LABEL, MACRO, EvalReport, Prediction, Score, TaskInfo
from carve.evaluation.suite import EvalExample, TaskSuite, load_suite

if TYPE_CHECKING:  # pragma: no cover
    from carve.engine.decoding import Engine

DEFAULT_MAX_CONTEXT = 2048  # prompts beyond this are slow on a CPU and rarely help a small model
ANSWER_MARGIN = 8  # tokens of slack over a task's longest gold answer
JOURNAL = "predictions.partial.jsonl"


class EvalError(ValueError):
    """An evaluation that cannot start as asked; the message says why."""


@dataclass(frozen=True)
class TaskPlan:
    """One task as it will run: the examples kept and the new-token budget."""

    suite: TaskSuite
    examples: list[EvalExample]
    max_new_tokens: int


@dataclass(frozen=True)
class EvalSettings:
    shots: tuple[int, ...]
    limit: int | None
    max_new_tokens: int
    batch_size: int
    max_context: int


def evaluate_models(
    engine: "Engine",
    models: dict[str, str | None],
    tasks_dir: Path,
    shots: Sequence[int],
    demos: "DemoSet | None",
    limit: int | None,
    out_dir: Path,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_context: int = DEFAULT_MAX_CONTEXT,
    identities: dict[str, str] | None = None,
    against: Sequence[str] = (),
) -> EvalReport:
    """Evaluate every model on every task at every k and write the four result files.

    ``models`` maps a label to an adapter already loaded in ``engine`` (None for
    the base). ``batch_size`` counts examples; each batch decodes that many rows
    per model. ``identities`` (label -> weights fingerprint) decides which
    journaled predictions of an interrupted run may be reused; without it a
    model is known by its label and adapter name only. Every adapter's paired
    gain is measured against the base and against each label in ``against``
    (the seeds-only adapter a self-specialized one must beat). Nothing is written
    unless the suite, models and settings are valid.
    """

    settings = EvalSettings(tuple(shots), limit, max_new_tokens, batch_size, max_context)
    unknown = [label for label in against if label not in models or label == BASE_LABEL]
    if unknown:
        raise EvalError(f"--against {', '.join(unknown)}: not an adapter of this evaluation (adapters: {', '.join(m for m in models if m != BASE_LABEL) or 'none'})")
    suites = load_suite(Path(tasks_dir))
    _check(engine, models, settings, demos)
    started = time.monotonic()
    plans = [TaskPlan(suite, _examples(suite, limit), _answer_budget(engine, suite, max_new_tokens)) for suite in suites]
    prompts = _build_prompts(engine, settings, plans, list(demos.seeds) if demos is not None else [])
    journal = Journal(Path(out_dir) / JOURNAL)
    known = {label: (identities or {}).get(label) or f"{engine.base_label}/{label}/{adapter}" for label, adapter in models.items()}
    predictions = _run(engine, models, settings, plans, prompts, journal, known)
    report = _aggregate(engine, models, settings, plans, predictions, demos, time.monotonic() - started, against)
    write_outputs(report, predictions, Path(out_dir))
    journal.remove()
    return report


class Journal:
    """Predictions of finished batches, appended as they come: what a resumed evaluation reuses."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, Prediction] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["key"]] = Prediction.model_validate(entry["prediction"])
                except (ValueError, KeyError):
                    continue  # a line torn by the kill: that batch is asked again

    @staticmethod
    def key(identity: str, prompt: str, max_new_tokens: int) -> str:
        return hashlib.sha256(f"{identity}\0{max_new_tokens}\0{prompt}".encode()).hexdigest()

    def append(self, entries: list[tuple[str, Prediction]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"key": key, "prediction": p.model_dump()}, ensure_ascii=False) + "\n" for key, p in entries))
            handle.flush()
        self.done.update(entries)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _check(engine: "Engine", models: dict[str, str | None], settings: EvalSettings, demos: "DemoSet | None") -> None:
    if not models:
        raise EvalError("no model to evaluate")
    missing = [a for a in models.values() if a is not None and a not in engine.adapters]
    if missing:
        raise EvalError(f"adapter(s) {', '.join(missing)} not loaded in the engine (loaded: {', '.join(engine.adapters) or 'none'})")
    if not settings.shots or any(k < 0 for k in settings.shots) or len(set(settings.shots)) != len(settings.shots):
        raise EvalError(f"shots must be distinct non-negative numbers, got {list(settings.shots)}")
    if max(settings.shots) > 0:
        if demos is None:
            raise EvalError(f"k={max(settings.shots)} needs demonstrations: give a seed set (--demos)")
        if len(demos.seeds) < max(settings.shots):
            raise EvalError(f"k={max(settings.shots)} needs at least that many seeds; {demos.path} has {len(demos.seeds)}")
    if settings.limit is not None and settings.limit < 1:
        raise EvalError(f"limit must be at least 1, got {settings.limit}")
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise EvalError("batch size and max new tokens must be at least 1")


def context_window(engine: "Engine", cap: int) -> int:
    """The model's maximum positions, capped (long prompts are slow on a CPU)."""
    return min(max_positions(base_model(engine.model).config.to_dict(), default=cap), cap)


def _fitter(engine: "Engine", window: int, max_new: int) -> PromptFitter:
    budget = window - max_new
    if budget < 16:
        raise EvalError(f"a context of {window} tokens leaves no room for prompts after {max_new} new tokens")
    return PromptFitter(
        budget=budget,
        count=lambda text: len(engine.encode(text)),
        encode=lambda text: encode_plain(engine.tokenizer, text),
        decode=lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True),
    )


def _build_prompts(engine: "Engine", settings: EvalSettings, plans: list[TaskPlan], seeds: list[Demo]) -> dict[tuple[int, str], list[BuiltPrompt]]:
    """Every prompt of the run, built before decoding starts so an example that cannot fit fails early."""
    window = context_window(engine, settings.max_context)
    prompts: dict[tuple[int, str], list[BuiltPrompt]] = {}
    for plan in plans:
        fitter = _fitter(engine, window, plan.max_new_tokens)
        for k in settings.shots:
            prompts[(k, plan.suite.task)] = [fitter.build(e, pick_demos(seeds, e, k)) for e in plan.examples]
    return prompts


def _examples(suite: TaskSuite, limit: int | None) -> list[EvalExample]:
    return suite.examples[:limit] if limit else list(suite.examples)


def _answer_budget(engine: "Engine", suite: TaskSuite, cap: int) -> int:
    """New tokens for a task: its longest gold answer (over the whole file) plus a margin, at most ``cap``.

    Yes/no and true/false tasks then stop after a few tokens instead of 64,
    which is most of the decoding time on a CPU; every model gets the same budget.
    """
    longest = max(len(encode_plain(engine.tokenizer, a)) for e in suite.examples for a in e.answers)
    return min(cap, longest + ANSWER_MARGIN)


def _run(
    engine: "Engine",
    models: dict[str, str | None],
    settings: EvalSettings,
    plans: list[TaskPlan],
    prompts: dict[tuple[int, str], list[BuiltPrompt]],
    journal: Journal,
    identities: dict[str, str],
) -> list[Prediction]:
    from carve.common.progress import stage
    from carve.engine.decoding import GenerationRequest, Sampling

    labels = list(models)
    stops = eval_stop_strings()
    total = sum(len(plan.examples) for plan in plans) * len(settings.shots) * len(labels)
    predictions: list[Prediction] = []
    with stage("eval", total, "answers") as progress:
        for k in settings.shots:
            for plan in plans:
                built = prompts[(k, plan.suite.task)]
                sampling = Sampling(max_new_tokens=plan.max_new_tokens, temperature=0.0, seed=0, stop=stops)
                keys = {(i, label): Journal.key(identities[label], built[i].text, plan.max_new_tokens) for i in range(len(built)) for label in labels}
                reused = [(i, label) for (i, label), key in keys.items() if key in journal.done]
                for i, label in reused:  # rescored: the gold answers may have been corrected since
                    saved = journal.done[keys[(i, label)]]
                    predictions.append(_scored(plan.examples[i], label, k, built[i], saved.prediction, saved.finish_reason))
                progress.resumed(len(reused))
                # Similar lengths together waste less padding; the fixed order keeps runs identical.
                order = sorted(range(len(built)), key=lambda i: (built[i].prompt_tokens, i))
                for start in range(0, len(order), settings.batch_size):
                    rows = [(i, label) for i in order[start : start + settings.batch_size] for label in labels if keys[(i, label)] not in journal.done]
                    if not rows:
                        continue
                    requests = [GenerationRequest.single(built[i].text, models[label], sampling) for i, label in rows]
                    made = [_scored(plan.examples[i], label, k, built[i], c.text, c.finish_reason) for (i, label), c in zip(rows, engine.generate(requests))]
                    journal.append([(keys[row], p) for row, p in zip(rows, made)])
                    predictions += made
                    progress.advance(len(requests), note=f"k={k} {plan.suite.task}")
    flat = [(plan.suite.task, e.id) for plan in plans for e in plan.examples]
    position = {key: n for n, key in enumerate(flat)}  # suite order, whatever the batch order was
    predictions.sort(key=lambda p: (settings.shots.index(p.k), position[(p.task, p.id)], labels.index(p.model)))
    return predictions


def _scored(example: EvalExample, label: str, k: int, prompt: BuiltPrompt, answer: str, finish_reason: str) -> Prediction:
    text = answer.strip()
    f1, rouge = score_prediction(text, example.answers)
    return Prediction(
        task=example.task,
        id=example.id,
        model=label,
        k=k,
        shots_used=prompt.shots_used,
        input_trimmed=prompt.input_trimmed,
        prompt_tokens=prompt.prompt_tokens,
        prediction=text,
        finish_reason=finish_reason,
        answers=list(example.answers),
        f1=round(100 * f1, 4),
        rouge_l=round(100 * rouge, 4),
    )


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _aggregate(engine: "Engine", models: dict[str, str | None], settings: EvalSettings, plans: list[TaskPlan], predictions: list[Prediction], demos: "DemoSet | None", wall: float, against: Sequence[str] = ()
) -> EvalReport:
    scores: list[Score] = []
    macro: list[Score] = []
    for k in settings.shots:
        for label in models:
            per_task: list[Score] = []
            for plan in plans:
                rows = [p for p in predictions if p.task == plan.suite.task and p.model == label and p.k == k]
                per_task.append(
                    Score(
                        task=plan.suite.task,
                        model=label,
                        k=k,
                        f1=_mean([p.f1 for p in rows]),
                        rouge_l=_mean([p.rouge_l for p in rows]),
                        n=len(rows),
                        shots_used=_mean([float(p.shots_used) for p in rows]),
                        inputs_trimmed=sum(p.input_trimmed for p in rows),
                    )
                )
            scores.extend(per_task)
            macro.append(
                Score(
                    task=MACRO,
                    model=label,
                    k=k,
                    f1=_mean([s.f1 for s in per_task]),
                    rouge_l=_mean([s.rouge_l for s in per_task]),
                    n=sum(s.n for s in per_task),
                    shots_used=_mean([s.shots_used for s in per_task]),
                    inputs_trimmed=sum(s.inputs_trimmed for s in per_task),
                )
            )
    return EvalReport(
        base_model=engine.base_label,
        models=dict(models),
        shots=list(settings.shots),
        tasks=[
            TaskInfo(task=p.suite.task, source=p.suite.source, examples=len(p.examples), available=len(p.suite.examples), max_new_tokens=p.max_new_tokens)
            for p in plans
        ],
        demos=f"{demos.domain.name} ({demos.path}, {len(demos.seeds)} seeds)" if demos is not None else None,
        limit=settings.limit,
        max_context=context_window(engine, settings.max_context),
        batch_size=settings.batch_size,
        scores=scores,
        macro=macro,
        constant_answers=[c for plan in plans if (c := constant_answer(plan.suite.task, plan.examples)) is not None],
        gains=paired_gains(predictions, BASE_LABEL) + [g for label in against for g in paired_gains(predictions, label) if g.model != BASE_LABEL],
        generations=len(predictions),
        wall_time_s=round(wall, 2),
    )

