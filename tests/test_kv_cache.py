"""The engine's preallocated KV cache: keeping rows in order compacts in place, repeating rows copies; both equal an index select."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from carve.engine.kv_cache import KVCache  # noqa: E402


def filled(rows: int, length: int = 5, capacity: int = 9) -> KVCache:
    cache = KVCache(layers=2, kv_heads=3, head_dim=4, capacity=capacity, dtype=torch.float32, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(rows)
    for layer in range(2):
        cache.write(layer, torch.randn(rows, 3, length, 4, generator=generator), torch.randn(rows, 3, length, 4, generator=generator))
    cache.advance(length)
    return cache


@pytest.mark.parametrize("index", [[0, 2, 5], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [4], [], [5, 1, 3], [0, 0, 2, 2, 2]])
def test_selected_rows_hold_what_an_index_select_gives_and_writing_goes_on(index):
    cache = filled(6)
    assert cache.keys is not None and cache.values is not None
    keys, values = cache.keys[:, :, :, :5].clone(), cache.values[:, :, :, :5].clone()
    storage = cache.keys.untyped_storage().data_ptr()
    chosen = torch.tensor(index, dtype=torch.long)
    cache.batch_select_indices(chosen)
    assert torch.equal(cache.keys[:, :, :, :5], keys[:, chosen]) and torch.equal(cache.values[:, :, :, :5], values[:, chosen])
    in_order = all(a < b for a, b in zip(index, index[1:]))
    assert (cache.keys.untyped_storage().data_ptr() == storage) == in_order  # in order: compacted in place, no new cache
    new = torch.ones(len(index), 3, 1, 4)
    for layer in range(2):
        cache.write(layer, new, -new)
    cache.advance(1)
    assert bool((cache.keys[:, :, :, 5] == 1).all()) and bool((cache.values[:, :, :, 5] == -1).all())
    assert torch.equal(cache.keys[:, :, :, :5], keys[:, chosen])


def test_rows_joining_are_appended_in_place_into_spare_rows_as_a_new_joined_cache_would_hold_them():
    from carve.engine.kv_cache import joined

    a, b, c = filled(2, length=4, capacity=6), filled(3, length=6, capacity=8), filled(1, length=3)
    merged = joined(a, 1, b, 2, new_columns=3)  # a's first column and b's first two are dead
    assert (merged.rows, merged.length, merged.capacity) == (5, 4, 10)
    assert merged.keys is not None and a.keys is not None and b.keys is not None and c.keys is not None
    assert torch.equal(merged.keys[:, :2, :, 1:4], a.keys[:, :, :, 1:4]) and bool((merged.keys[:, :2, :, :1] == 0).all())
    assert torch.equal(merged.keys[:, 2:, :, :4], b.keys[:, :, :, 2:6])
    storage = merged.keys.untyped_storage().data_ptr()
    before = merged.keys[:, :, :, :4].clone()
    assert merged.append(c, 0, new_columns=5)  # 3 columns right-aligned at column 4, zero before
    assert merged.keys.untyped_storage().data_ptr() == storage and merged.rows == 6
    assert torch.equal(merged.keys[:, :5, :, :4], before) and torch.equal(merged.values[:, 5:, :, 1:4], c.values[:, :, :, :3])
    assert bool((merged.keys[:, 5:, :, :1] == 0).all())
    assert not merged.append(c, 0, new_columns=7)  # no room for the new columns: the caller joins into a new cache
    assert not filled(2).append(c, 0, new_columns=1)  # no spare rows
    assert not merged.append(b, 0, new_columns=1)  # more columns written than this cache has
    assert merged.rows == 6
