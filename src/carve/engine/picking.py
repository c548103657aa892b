"""Each request's next token and when it ends: branch combination rules, penalties, sampling, stop strings.

Sampling uses one torch.Generator per request, so a request's tokens never
depend on what else shares its batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from carve.engine.requests import EngineError, Rule, Sampling

if TYPE_CHECKING:  # pragma: no cover
    import torch


def combine(logprobs: "torch.Tensor", rule: Rule, weights: Sequence[float], alpha: float = 0.1) -> "torch.Tensor":
    """Combine branch log-probabilities [n_branches, vocab] into one score vector [vocab].

    The scores are log-space: for ``single`` and ``mixture`` a log-distribution,
    for ``contrast`` the contrastive score with implausible tokens at -inf.
    """
    import torch

    if rule == "single":
        return logprobs[0]
    if rule == "mixture":
        w = torch.tensor(weights, dtype=logprobs.dtype, device=logprobs.device)
        log_w = torch.log(w / w.sum()).unsqueeze(1)
        return torch.logsumexp(logprobs + log_w, dim=0)
    if rule == "contrast":
        expert, amateur = logprobs[0], logprobs[1]
        plausible = expert >= expert.max() + math.log(alpha) if alpha > 0 else torch.ones_like(expert, dtype=torch.bool)
        score = expert - weights[1] * amateur
        return torch.where(plausible, score, torch.full_like(score, -math.inf))
    raise EngineError(f"unknown rule {rule!r}")


def adjust_scores(scores: "torch.Tensor", sampling: Sampling, generated: Sequence[int] = ()) -> "torch.Tensor":
    """``scores`` [vocab] with the request's penalties over ``generated`` (its tokens so far) and its logit bias applied.

    Returns ``scores`` itself when the sampling has neither, so default requests decode exactly as before.
    """
    import torch

    if not sampling.adjusts_scores:
        return scores
    adjusted = scores.clone()
    if generated and (sampling.frequency_penalty or sampling.presence_penalty):
        ids, counts = torch.unique(torch.tensor(list(generated), device=scores.device), return_counts=True)
        penalty = sampling.frequency_penalty * counts.to(scores.dtype) + sampling.presence_penalty
        adjusted[ids] -= penalty
    if sampling.logit_bias:
        ids = torch.tensor([t for t, _ in sampling.logit_bias], device=scores.device)
        adjusted[ids] += torch.tensor([b for _, b in sampling.logit_bias], dtype=scores.dtype, device=scores.device)
    return adjusted


def pick_token(scores: "torch.Tensor", sampling: Sampling, generator: "torch.Generator | None", generated: Sequence[int] = ()) -> int:
    """Greedy argmax, or a temperature / top-p sample drawn with the request's own generator.

    ``generated``: the request's tokens so far, for its frequency and presence penalties.
    """
    import torch

    scores = adjust_scores(scores, sampling, generated)
    if sampling.temperature == 0:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = nucleus_candidates(probs, sampling.top_p)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < sampling.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus_candidates(probs: "torch.Tensor", top_p: float, first: int = 1024) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The most probable tokens, sorted, enough of them to reach ``top_p``: the whole nucleus.

    Sorting a 50k vocabulary at every step was a fifth of sampling time; the
    nucleus almost always lies in the top thousand, so take the top-k and widen
    only when it falls short of ``top_p``.
    """
    import torch

    k = min(first, probs.shape[-1])
    while True:
        top, order = torch.topk(probs, k)
        if k == probs.shape[-1] or float(top.sum()) >= top_p:
            return top, order
        k = min(4 * k, probs.shape[-1])


class TextTracker:
    """Decodes one request's tokens incrementally, applying stop strings.

    Streaming withholds text that could still become a stop string and a
    trailing partial UTF-8 character, so streamed deltas concatenate to exactly
    the non-streamed text.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string has appeared (text cut before it)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text = self.text[:at]
                return True
        return False

    def delta(self, final: bool) -> str:
        safe = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            for stop in self.stop:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out



def new_generator(seed: int | None) -> "torch.Generator":
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return generator

