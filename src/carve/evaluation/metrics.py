"""The paper's two scores for generated answers: token F1 and ROUGE-L.

Every task is scored as free text generation (paper §4.1, after In-BoXBART):
token F1 with SQuAD's answer normalisation, and ROUGE-L F-measure as computed
by Google's ``rouge-score`` with Porter stemming. When a task lists several
acceptable answers (BioASQ synonyms), a prediction gets its best score over
them. Scores are fractions in [0, 1]; reports show them ×100 as the paper does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Any, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, drop articles, collapse whitespace.

    Punctuation is deleted, not replaced by a space (``first-degree`` becomes
    ``firstdegree``), exactly as the SQuAD v1.1 script does, so scores compare
    with published ones.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bag of tokens).

    Two empty answers agree (1.0); an empty answer against a non-empty one scores 0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure (longest common subsequence) with stemming; 0 when either side is empty."""
    return float(_scorer().score(gold, prediction)["rougeL"].fmeasure)


def best_over(metric: Any, prediction: str, answers: Sequence[str]) -> float:
    """The best score of ``prediction`` against any of the acceptable ``answers``."""
    if not answers:
        raise ValueError("at least one gold answer is needed to score a prediction")
    return max(metric(prediction, answer) for answer in answers)


def score_prediction(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(token F1, ROUGE-L), each the maximum over the acceptable answers."""
    return best_over(token_f1, prediction, answers), best_over(rouge_l, prediction, answers)
