"""A preallocated key/value cache written in place, for the engine's own forward pass.

Hugging Face's DynamicCache grows by concatenation, copying every layer's keys
and values at every step. Here each layer's K and V live in one tensor sized
for the whole call (the longest prompt plus the most new tokens), and a step
writes its column in place. Rows are left-padded to one common length, so every
row writes the same column; padding is masked out by the attention mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


class KVCache:
    """Keys and values of every layer, [layers, rows, kv_heads, capacity, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: "torch.dtype", device: "torch.device"):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.capacity = capacity
        self.dtype, self.device = dtype, device
        self.keys: "torch.Tensor | None" = None  # allocated at the first write, when the row count is known
        self.values: "torch.Tensor | None" = None
        self.length = 0  # columns written so far

    def write(self, layer: int, keys: "torch.Tensor", values: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Store a layer's new [rows, kv_heads, q, head_dim] at the next columns; returns all columns so far."""
        import torch

        if self.keys is None:
            shape = (self.layers, keys.shape[0], self.kv_heads, self.capacity, self.head_dim)
            self.keys = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.values = torch.empty(shape, dtype=self.dtype, device=self.device)
        assert self.values is not None
        start, end = self.length, self.length + keys.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} columns)")
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, columns: int) -> None:
        """Every layer has written ``columns`` more: the next write starts after them."""
        self.length += columns

    def batch_select_indices(self, index: "torch.Tensor") -> None:
        """Keep (or repeat) rows by index, copying only the columns written so far."""
        if self.keys is None or self.values is None:
            return
        import torch

        used = self.length
        keys = torch.empty((self.layers, len(index), self.kv_heads, self.capacity, self.head_dim), dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        keys[:, :, :, :used] = self.keys[:, index, :, :used]
        values[:, :, :, :used] = self.values[:, index, :, :used]
        self.keys, self.values = keys, values
