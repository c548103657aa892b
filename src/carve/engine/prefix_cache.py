"""Prompt prefixes' keys and values kept across requests (automatic prefix caching, as vLLM's).

A prefill group whose rows share a prompt prefix runs that prefix once per
adapter (carve.engine.session). Its keys and values are kept here, per adapter,
so that a later request starting with the same tokens (a chat system text, the
instruction-generation template, k-shot demonstrations) copies them instead of
running them again. In a causal model the first m columns depend on the first m
tokens only, so any common start of at least ``min_tokens`` with a kept prefix
is reused, not only the whole of it. The least recently used prefixes leave
first once the kept tensors pass ``max_bytes``.

Only the engine's own runner uses it (its KV cache is a plain tensor pair; the
runner counts positions, so sliding-window layers stay exact). An adapter that
is loaded again or unloaded takes its prefixes with it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class _Entry:
    ids: tuple[int, ...]
    keys: "torch.Tensor"  # [layers, kv_heads, len(ids), head_dim]
    values: "torch.Tensor"

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two id sequences share."""
    return len(os.path.commonprefix([list(a), list(b)]))


class PrefixCache:
    """Keys and values of prompt prefixes, per adapter, least recently used first out."""

    def __init__(self, max_bytes: int = 256 * 2**20, min_tokens: int = 16):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self.nbytes = 0
        self.reused_tokens = 0  # prompt tokens copied from here rather than run (counted by the caller that copies)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, adapters: Sequence[str], prompts: Sequence[Sequence[int]]) -> int:
        """The longest start every prompt shares with a kept prefix of every adapter given (0 below ``min_tokens``).

        Each prompt keeps at least its last token to run (the next token's logits come from it).
        The prefixes found count as just used, so the next stores evict them last.
        """
        if not self._entries or not prompts:
            return 0
        first = prompts[0]
        length = min(len(p) for p in prompts) - 1
        for prompt in prompts[1:]:
            length = min(length, common_length(first, prompt))
        found = []
        for adapter in set(adapters):
            shared, key = max(((common_length(first, ids), (name, ids)) for (name, ids) in self._entries if name == adapter), default=(0, None))
            length = min(length, shared)
            found.append(key)
        if length < self.min_tokens:
            return 0
        for key in found:
            self._entries.move_to_end(key)
        return length

    def load(self, adapter: str, ids: Sequence[int]) -> tuple["torch.Tensor", "torch.Tensor"] | None:
        """The kept keys and values of ``ids`` for ``adapter``, [layers, kv_heads, len(ids), head_dim]; None if no longer kept."""
        n = len(ids)
        for key, entry in reversed(self._entries.items()):
            if key[0] == adapter and common_length(entry.ids, ids) >= n:
                self._entries.move_to_end(key)
                return entry.keys[:, :, :n], entry.values[:, :, :n]
        return None

    def store(self, adapter: str, ids: Sequence[int], keys: "torch.Tensor", values: "torch.Tensor", copy: bool = True) -> None:
        """Keep a prefix's keys and values: copied unless ``copy`` is False (the caller's tensors are fresh, not views of a cache)."""
        key = (adapter, tuple(ids))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        if 2 * keys.numel() * keys.element_size() > self.max_bytes:
            return
        entry = _Entry(key[1], keys.clone() if copy else keys, values.clone() if copy else values)
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def forget(self, adapter: str | None = None) -> None:
        """Drop an adapter's prefixes (its weights changed or left), or every prefix."""
        for key in [k for k in self._entries if adapter is None or k[0] == adapter]:
            self.nbytes -= self._entries.pop(key).nbytes
