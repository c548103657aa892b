"""What the engine is asked and what it answers: requests of weighted branches, sampling settings, completions, stream events."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

Rule = Literal["single", "mixture", "contrast"]
FinishReason = Literal["stop", "length", "eos"]


class EngineError(ValueError):
    """A request or adapter the engine refuses; the message says why."""


@dataclass(frozen=True)
class Branch:
    """One prompt decoded under one adapter (None = the base model)."""

    prompt: str | Sequence[int]
    adapter: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Grammar:
    """Structured output: the generated text must be a string of this grammar's language (carve.engine.constraints)."""

    kind: Literal["json_schema", "regex", "lark"]
    source: str  # the JSON schema as JSON text, the regular expression, or the Lark grammar


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    alpha: float = 0.1  # contrast: plausibility threshold relative to the expert's top token
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)
    # OpenAI's: subtract frequency_penalty * count(t) + presence_penalty * [count(t) > 0] over the tokens generated so far,
    # add logit_bias[t]; all on the step's combined scores, before temperature. Zeros and () change nothing.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    grammar: Grammar | None = None  # structured output: only tokens that keep the text inside the grammar

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.alpha <= 1:
            raise EngineError(f"alpha must be in [0, 1], got {self.alpha}")
        if not all(math.isfinite(v) for v in (self.frequency_penalty, self.presence_penalty, *(b for _, b in self.logit_bias))):
            raise EngineError("penalties and logit_bias values must be finite")

    @property
    def adjusts_scores(self) -> bool:
        """Whether penalties or a logit bias change the scores a token is picked from."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


@dataclass(frozen=True)
class GenerationRequest:
    branches: tuple[Branch, ...]
    rule: Rule = "single"
    sampling: Sampling = field(default_factory=Sampling)
    record_scores: bool = False  # keep every step's combined score vector (for inspection and tests)

    def __post_init__(self) -> None:
        n = len(self.branches)
        if n == 0:
            raise EngineError("a request needs at least one branch")
        if self.rule == "single" and n != 1:
            raise EngineError(f"rule 'single' takes exactly one branch, got {n}")
        if self.rule == "contrast" and n != 2:
            raise EngineError(f"rule 'contrast' takes two branches (expert, amateur), got {n}")
        if self.rule == "mixture" and any(b.weight <= 0 or not math.isfinite(b.weight) for b in self.branches):
            raise EngineError("mixture weights must be positive and finite")
        if self.rule not in ("single", "mixture", "contrast"):
            raise EngineError(f"unknown rule {self.rule!r}: use single, mixture or contrast")

    @classmethod
    def single(cls, prompt: str | Sequence[int], adapter: str | None = None, sampling: Sampling | None = None) -> "GenerationRequest":
        return cls((Branch(prompt, adapter),), "single", sampling or Sampling())


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    step_scores: list["torch.Tensor"] | None = None  # combined log-space scores per step, when recorded


@dataclass(frozen=True)
class StreamEvent:
    """New text of one request after a decoding step; ``finish_reason`` set on its last event."""

    index: int
    delta: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    scores: "torch.Tensor | None" = None  # the step's combined scores, when the request records them

