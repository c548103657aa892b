"""The prefix cache's own rules: the longest common start, per adapter, least recently used out within its bytes."""

from __future__ import annotations

import torch

from carve.engine.prefix_cache import PrefixCache


def kv(n: int, fill: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of n columns: [layers 2, kv_heads 1, n, head_dim 4], column j holding fill + j."""
    column = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1) + fill
    return column.expand(2, 1, n, 4).clone(), -column.expand(2, 1, n, 4).clone()


def test_a_common_start_of_a_kept_prefix_is_found_and_its_columns_given() -> None:
    cache = PrefixCache(min_tokens=3)
    cache.store("a", list(range(10)), *kv(10))
    assert cache.match(["a"], [list(range(6)) + [99, 98]]) == 6  # shares 6 tokens of the 10
    assert cache.match(["a"], [list(range(10)) + [5]]) == 10
    assert cache.match(["a"], [list(range(10))]) == 9  # the prompt's last token is left to run
    assert cache.match(["a", "b"], [list(range(8))]) == 0  # b has nothing kept
    assert cache.match(["a"], [[0, 1, 7, 7]]) == 0  # under min_tokens
    assert cache.match(["a"], [list(range(8)), list(range(4)) + [50, 51]]) == 4  # what every prompt shares
    found = cache.load("a", list(range(6)))
    assert found is not None
    keys, values = found
    assert keys.shape == (2, 1, 6, 4) and torch.equal(keys[0, 0, :, 0], torch.arange(6.0) + 1) and torch.equal(values, -keys)
    assert cache.load("b", list(range(6))) is None and cache.load("a", [0, 1, 2, 7]) is None


def test_entries_are_copies_forgotten_per_adapter_and_evicted_least_recently_used_first() -> None:
    keys, values = kv(4)
    one_entry = 2 * keys.numel() * 4
    cache = PrefixCache(max_bytes=2 * one_entry, min_tokens=2)
    cache.store("a", [1, 2, 3, 4], keys, values)
    keys.zero_()  # the caller's cache is written over later
    assert cache.load("a", [1, 2, 3])[0][0, 0, 0, 0] == 1.0  # type: ignore[index]
    cache.store("b", [1, 2, 3, 4], *kv(4))
    assert cache.match(["a"], [[1, 2, 3, 9]]) == 3  # a found last: b leaves first
    cache.store("c", [1, 2, 3, 4], *kv(4))
    assert len(cache) == 2 and cache.match(["b"], [[1, 2, 3, 9]]) == 0 and cache.match(["a"], [[1, 2, 3, 9]]) == 3
    cache.forget("a")
    assert len(cache) == 1 and cache.nbytes == one_entry
    cache.forget()
    assert len(cache) == 0 and cache.nbytes == 0
    cache.store("big", list(range(100)), *kv(100))  # larger than the whole budget: not kept
    assert len(cache) == 0
