"""A preallocated key/value cache written in place, for the engine's own forward pass.

Hugging Face's DynamicCache grows by concatenation, copying every layer's keys
and values at every step. Here each layer's K and V live in one tensor sized
for the whole call (the longest prompt plus the most new tokens), and a step
writes its column in place. Rows are left-padded to one common length, so every
row writes the same column; padding is masked out by the attention mask.

A running batch changes rows between steps (continuous batching): rows that
leave are compacted in place, and rows that join are written into spare rows
when the cache has them, so neither reallocates nor copies the rows that stay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


class KVCache:
    """Keys and values of every layer, [layers, rows, kv_heads, capacity, head_dim], in tensors that may hold spare rows."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: "torch.dtype", device: "torch.device", spare_rows: int = 0):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.capacity = capacity
        self.dtype, self.device = dtype, device
        self.spare_rows = spare_rows  # rows allocated beyond the first write's, for rows that join later
        self._keys: "torch.Tensor | None" = None  # allocated at the first write, when the row count is known
        self._values: "torch.Tensor | None" = None
        self.rows = 0  # rows in use: the first ``rows`` of the allocation
        self.length = 0  # columns written so far

    @property
    def keys(self) -> "torch.Tensor | None":
        return None if self._keys is None else self._keys[:, : self.rows]

    @property
    def values(self) -> "torch.Tensor | None":
        return None if self._values is None else self._values[:, : self.rows]

    def allocate(self, rows: int) -> None:
        import torch

        shape = (self.layers, rows + self.spare_rows, self.kv_heads, self.capacity, self.head_dim)
        self._keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._values = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.rows = rows

    def write(self, layer: int, keys: "torch.Tensor", values: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Store a layer's new [rows, kv_heads, q, head_dim] at the next columns; returns all columns so far."""
        if self._keys is None:
            self.allocate(keys.shape[0])
        assert self._keys is not None and self._values is not None
        start, end = self.length, self.length + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} columns)")
        self._keys[layer, : self.rows, :, start:end] = keys
        self._values[layer, : self.rows, :, start:end] = values
        return self._keys[layer, : self.rows, :, :end], self._values[layer, : self.rows, :, :end]

    def load_prefix(self, prefixes: "Sequence[tuple[torch.Tensor, torch.Tensor]]") -> None:
        """Start this (empty) cache with one row per prefix: its keys and values, [layers, kv_heads, n, head_dim], the same n for all."""
        columns = prefixes[0][0].shape[2]
        self.allocate(len(prefixes))
        assert self._keys is not None and self._values is not None
        for row, (keys, values) in enumerate(prefixes):
            self._keys[:, row, :, :columns] = keys
            self._values[:, row, :, :columns] = values
        self.length = columns

    def advance(self, columns: int) -> None:
        """Every layer has written ``columns`` more: the next write starts after them."""
        self.length += columns

    def rewind(self, columns: int) -> None:
        """Forget the last ``columns`` written (draft tokens no row kept): the next write overwrites them."""
        if not 0 <= columns <= self.length:
            raise ValueError(f"cannot rewind {columns} of {self.length} columns")
        self.length -= columns

    def batch_select_indices(self, index: "torch.Tensor") -> None:
        """Keep (or repeat) rows by index, copying only the columns written so far.

        Keeping rows in their order (rows finished, a request cancelled) moves
        each kept row at most once, in place, and only those after the first
        row that leaves: the cache is neither reallocated nor copied whole,
        which on a CPU cost a running batch a step's time at every retirement.
        """
        if self._keys is None or self._values is None:
            return
        import torch

        used = self.length
        if len(index) <= self.rows and bool((index[1:] > index[:-1]).all()):
            targets = torch.arange(len(index), device=index.device)
            moved = index != targets  # ascending: a row is read before any later target overwrites it
            with torch.inference_mode():  # the cache's tensors were made under it (a cancel arrives outside)
                for target, source in zip(targets[moved].tolist(), index[moved].tolist()):
                    self._keys[:, target, :, :used] = self._keys[:, source, :, :used]
                    self._values[:, target, :, :used] = self._values[:, source, :, :used]
            self.rows = len(index)
            return
        keys, values = self._keys[:, index, :, :used], self._values[:, index, :, :used]
        self.allocate(len(index))
        assert self._keys is not None and self._values is not None
        self._keys[:, : self.rows, :, :used] = keys
        self._values[:, : self.rows, :, :used] = values

    def append(self, other: "KVCache", skip: int, new_columns: int) -> bool:
        """Put ``other``'s rows (without their first ``skip`` columns) after this cache's, right-aligned at its last column.

        Done in place, without touching this cache's rows, when it has the
        spare rows, at least as many columns written, and room for
        ``new_columns`` more; the joining rows' leading columns are zeroed
        (padding is masked, but must be finite: 0 * NaN is NaN). False, and
        nothing changed, when it does not fit.
        """
        if self._keys is None or self._values is None or other.keys is None or other.values is None:
            return False
        used = other.length - skip
        start, end = self.rows, self.rows + other.rows
        if end > self._keys.shape[1] or used > self.length or self.length + new_columns > self.capacity:
            return False
        import torch

        with torch.inference_mode():
            for target, source in ((self._keys, other.keys), (self._values, other.values)):
                target[:, start:end, :, : self.length - used] = 0
                target[:, start:end, :, self.length - used : self.length] = source[:, :, :, skip : other.length]
        self.rows = end
        return True


def joined(a: KVCache, skip_a: int, b: KVCache, skip_b: int, new_columns: int) -> KVCache:
    """A new cache with ``a``'s rows then ``b``'s, each without its first ``skip`` columns, right-aligned, padding zeroed.

    It is made with room to spare (as many rows again, twice ``new_columns``
    more columns), so that the rows joining after it are appended in place.
    """
    width = max(a.length - skip_a, b.length - skip_b)
    out = KVCache(a.layers, a.kv_heads, a.head_dim, width + 2 * new_columns, a.dtype, a.device, spare_rows=2 * (a.rows + b.rows))
    out.allocate(0)
    out.length = width
    placed = out.append(a, skip_a, 0) and out.append(b, skip_b, 0)
    assert placed, "a new cache with room for both holds both"
    return out
