"""Draft tokens for speculative decoding by prompt lookup (n-gram matching, as vLLM's ``ngram`` method).

A request's text often repeats itself or its prompt (names, numbers, a
format the demonstrations set). The draft for the next tokens is what followed
the latest earlier occurrence of the request's last few tokens. The engine
checks a draft in one forward pass with the token before it and keeps the
longest part the request's own choice agrees with (its argmax, or its seeded
sample drawn as without drafts), so the tokens are the ones decoding without
drafts gives; a pass then yields several tokens for about the price of one (a
decode step reads every weight once whatever its width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DraftSettings:
    """``tokens`` drafted per row and step (0: no speculation); n-grams of ``min_match``..``max_match`` tokens.

    ``max_rows``: no drafts when more rows decode than this (a wide step is
    bound by its arithmetic, not by reading the weights, and extra tokens stop
    being nearly free), as vLLM's ``disable_by_batch_size``.
    """

    tokens: int = 0
    min_match: int = 2
    max_match: int = 4
    max_rows: int = 4

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.max_rows < 1 or not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"bad draft settings: {self}")

    @property
    def spare_columns(self) -> int:
        """KV-cache columns kept beyond a batch's tokens for drafts: rows that keep fewer than others leave masked columns."""
        return 8 * self.tokens


def propose(context: Sequence[int], settings: DraftSettings, limit: int) -> list[int]:
    """Up to ``min(settings.tokens, limit)`` tokens that followed the latest earlier match of ``context``'s end (longest n-gram first)."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    size = min(settings.tokens, limit)
    if size <= 0 or len(context) <= settings.min_match:
        return []
    ids = np.asarray(context, dtype=np.int64)
    for n in range(min(settings.max_match, len(ids) - 1), settings.min_match - 1, -1):
        windows = sliding_window_view(ids[:-1], n)  # every n-gram that has a token after it
        starts = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if starts.size:
            after = int(starts[-1]) + n
            return ids[after : after + size].tolist()
    return []
