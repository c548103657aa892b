"""The records an evaluation writes and reads: per-task scores, paired gains, the report, each prediction."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from carve.artifact import BASE_MODEL
from carve.evaluation.constant import ConstantAnswer

BASE_LABEL = BASE_MODEL  # the base model's label in reports
MACRO = "macro average"


class Score(BaseModel):
    """Mean scores of one model at one k on one task (or the macro average), in percent."""

    task: str
    model: str
    k: int
    f1: float
    rouge_l: float
    n: int
    shots_used: float  # mean demonstrations that fitted in the prompt
    inputs_trimmed: int  # examples whose input was cut to fit the context


class TaskInfo(BaseModel):
    task: str
    source: str
    examples: int  # evaluated (after --limit)
    available: int  # in the file
    max_new_tokens: int


class Gain(BaseModel):
    """Macro-average difference of ``model`` minus ``baseline`` at one k, in points."""

    model: str
    baseline: str
    k: int
    metric: str
    gain: float
    low: float  # bounds of the 95% paired bootstrap interval
    high: float
    tasks_better: int
    tasks_worse: int
    worst_task: str
    worst_task_gain: float


class EvalReport(BaseModel):
    """Everything a reader or an adapter card needs about one evaluation run."""

    base_model: str
    models: dict[str, str | None]  # label -> adapter name (None: the base model)
    shots: list[int]
    tasks: list[TaskInfo]
    demos: str | None  # seed set used for demonstrations
    limit: int | None
    max_context: int
    batch_size: int
    scores: list[Score]  # one per task x model x k
    macro: list[Score]  # one per model x k, averaged over tasks
    gains: list[Gain] = []  # each adapter against the base, with a paired bootstrap interval
    constant_answers: list[ConstantAnswer] = []  # label tasks: the score of answering the majority label throughout
    generations: int
    wall_time_s: float

    def score(self, task: str, model: str, k: int) -> Score:
        for item in self.macro if task == MACRO else self.scores:
            if item.task == task and item.model == model and item.k == k:
                return item
        raise KeyError(f"no score for task {task!r}, model {model!r}, k={k}")

    def summary(self) -> dict[str, Any]:
        """Macro F1 / ROUGE-L per model and k: the short form stored in an adapter card."""
        return {
            "tasks": [t.task for t in self.tasks],
            "shots": self.shots,
            "macro": {m: {f"k={s.k}": {"f1": s.f1, "rouge_l": s.rouge_l} for s in self.macro if s.model == m} for m in self.models},
            "f1_gain_over_base": {f"{g.model} k={g.k}": _short(g) for g in self.gains if g.metric == "f1" and g.baseline == BASE_LABEL},
            "f1_gain_over": {f"{g.model} vs {g.baseline} k={g.k}": _short(g) for g in self.gains if g.metric == "f1" and g.baseline != BASE_LABEL},
        }

    def gain(self, model: str, baseline: str, k: int, metric: str = "f1") -> Gain | None:
        return next((g for g in self.gains if (g.model, g.baseline, g.k, g.metric) == (model, baseline, k, metric)), None)


def _short(gain: Gain) -> dict[str, Any]:
    return {"gain": gain.gain, "interval_95": [gain.low, gain.high], "tasks_worse": gain.tasks_worse}


class Prediction(BaseModel):
    """One saved prediction (a line of predictions.jsonl); scores in percent."""

    task: str
    id: str
    model: str
    k: int
    shots_used: int
    input_trimmed: bool
    prompt_tokens: int
    prediction: str
    finish_reason: str
    answers: list[str]
    f1: float
    rouge_l: float
