"""The constant-answer baseline of label tasks: the majority label, answered for every example.

At 135-270M parameters a gain on a label task (yes/no, true/false, a sentiment)
is often the label prior: a model that answers one label throughout scores
that label's share of the examples. A task counts as a label task when its
evaluated examples have at most ``MAX_LABELS`` distinct gold outputs of at
most ``MAX_LABEL_WORDS`` words each, and at least two examples per label; its
baseline answers the most common output everywhere, scored as a prediction.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from pydantic import BaseModel

from carve.evaluation.metrics import normalize_answer, score_prediction
from carve.evaluation.suite import EvalExample

MAX_LABELS = 5
MAX_LABEL_WORDS = 4


class ConstantAnswer(BaseModel):
    """A label task's majority label and the scores of answering it for every evaluated example, in percent."""

    task: str
    answer: str
    share: float  # of the examples whose output is that label
    f1: float
    rouge_l: float
    n: int


def constant_answer(task: str, examples: Sequence[EvalExample]) -> ConstantAnswer | None:
    """The baseline of one task, or None when the task is not a label task."""
    labels = Counter(normalize_answer(e.output) for e in examples)
    if not examples or len(labels) > MAX_LABELS or len(examples) < 2 * len(labels) or any(len(label.split()) > MAX_LABEL_WORDS for label in labels):
        return None
    majority, count = labels.most_common(1)[0]
    answer = next(e.output for e in examples if normalize_answer(e.output) == majority)
    scores = [score_prediction(answer, e.answers) for e in examples]
    return ConstantAnswer(
        task=task, answer=answer, share=round(100 * count / len(examples), 2),
        f1=round(100 * sum(f for f, _ in scores) / len(scores), 4), rouge_l=round(100 * sum(r for _, r in scores) / len(scores), 4), n=len(examples),
    )
