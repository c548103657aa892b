"""Is an adapter's gain over its base real? A paired bootstrap over the evaluated examples.

With 20-40 examples a task, a few points of macro F1 can be noise. For each
adapter and k, the gain is the macro-average difference to the base (tasks
weighed equally, as in the table); its 95% interval comes from resampling
each task's examples with replacement, the same examples for both models
(paired), ``rounds`` times. The count of tasks where the adapter is below
the base shows whether a gain hides a task that collapsed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from carve.evaluation.schema import Gain, Prediction

ROUNDS = 2000
CONFIDENCE = 0.95
TAIL_PERCENT = (1 - CONFIDENCE) / 2 * 100


def paired_gains(predictions: Sequence[Prediction], baseline: str, metrics: Sequence[str] = ("f1", "rouge_l"), rounds: int = ROUNDS, seed: int = 0) -> list[Gain]:
    """One Gain per (other model, k, metric), the models and k in the order the predictions give them."""
    import numpy as np

    scores: dict[tuple[str, int, str], dict[str, "Prediction"]] = defaultdict(dict)
    for p in predictions:
        scores[(p.model, p.k, p.task)][p.id] = p
    models = list(dict.fromkeys(p.model for p in predictions if p.model != baseline))
    shots = list(dict.fromkeys(p.k for p in predictions))
    tasks = list(dict.fromkeys(p.task for p in predictions))
    rng = np.random.default_rng(seed)
    gains = []
    for k in shots:
        for model in models:
            for metric in metrics:
                per_task: dict[str, np.ndarray] = {}
                for task in tasks:
                    ours, base = scores[(model, k, task)], scores[(baseline, k, task)]
                    ids = [i for i in base if i in ours]
                    if ids:
                        per_task[task] = np.array([getattr(ours[i], metric) - getattr(base[i], metric) for i in ids])
                if not per_task:
                    continue
                means = {task: float(d.mean()) for task, d in per_task.items()}
                resampled = np.mean([d[rng.integers(0, len(d), size=(rounds, len(d)))].mean(axis=1) for d in per_task.values()], axis=0)
                worst = min(means, key=lambda t: means[t])
                gains.append(
                    Gain(
                        model=model,
                        baseline=baseline,
                        k=k,
                        metric=metric,
                        gain=round(sum(means.values()) / len(means), 4),
                        low=round(float(np.percentile(resampled, TAIL_PERCENT)), 4),
                        high=round(float(np.percentile(resampled, 100 - TAIL_PERCENT)), 4),
                        tasks_better=sum(v > 0 for v in means.values()),
                        tasks_worse=sum(v < 0 for v in means.values()),
                        worst_task=worst,
                        worst_task_gain=round(means[worst], 4),
                    )
                )
    return gains
