"""How fluent a text is to the base model: mean negative log-likelihood per token.

A 135M-parameter generator sampling at the paper's temperature writes many
instructions that are word salad ("Serum intranucleotide _CHAR21 contains
complex structure contained in it twice."). Self-instruct's filters (length,
near-duplicates, malformed) keep them. The base model itself tells them
apart: such text is far less likely than the human-written seeds. The
threshold is therefore calibrated on the seed set (``fluency_limit``), not a
constant that would need retuning for every base.

Texts are scored one at a time (no padding), so a score never depends on
which other texts were scored with it: a resumed run filters identically.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

Scorer = Callable[[Sequence[str]], list[float]]


def mean_nll(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int = 256) -> list[float]:
    """Mean per-token negative log-likelihood (nats) of each text under ``model``; inf for a text under 2 tokens."""
    import torch

    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
            if len(ids) < 2:
                scores.append(math.inf)
                continue
            batch = torch.tensor([ids], device=device)
            logits = model(input_ids=batch).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="mean")
            scores.append(round(float(nll), 4))
    return scores


def engine_scorer(engine: Any) -> Scorer:
    """The base model of an engine as a scorer (adapters disabled, whatever the engine serves)."""

    def score(texts: Sequence[str]) -> list[float]:
        model = engine.model
        with engine.lock, model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            return mean_nll(model, engine.tokenizer, texts)

    return score


def fluency_limit(seed_scores: Sequence[float], margin: float) -> float:
    """The highest seed score plus ``margin`` nats: a generated text less fluent than every seed by that much is rejected."""
    finite = [s for s in seed_scores if math.isfinite(s)]
    if not finite:
        raise ValueError("no seed text could be scored")
    return max(finite) + margin


def pair_text(instruction: str, input: str) -> str:
    """What is scored for an (instruction, input) pair."""
    return f"{instruction.strip()}\n{input.strip()}".strip()
