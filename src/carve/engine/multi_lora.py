"""Many LoRA adapters in one batch at the cost of one: concatenated low-rank factors.

peft's mixed-adapter path loops, in every LoRA layer at every step, over the
adapters present in the batch (index lists built in Python, a gather and a
scatter per adapter), so a batch of 8 adapters costs far more than a batch of
one. Here the factors of the batch's adapters are concatenated once per engine
call: A_cat = [A_1; ...; A_n] (sum r_i x in) and B_cat = [s_1 B_1, ..., s_n B_n]
(out x sum r_i). Each row keeps only its own adapter's block of x A_cat^T (a 0/1
column mask; all zeros for base rows), so the delta is

    delta = ((x A_cat^T) * mask_row) B_cat^T  =  s_k B_k A_k x   for a row of adapter k,

exactly peft's vanilla LoRA (dropout is the identity at inference), in two
dense matmuls whatever the number of adapters. peft's own LoRA layers are
disabled meanwhile and the delta is added by a forward hook on each LoRA
module. Variants this does not cover (DoRA, LoRA on embeddings or convolutions,
lora bias) make :meth:`MultiLora.supports` false and the engine keeps peft's path.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

PEFT_BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch


class _LayerFactors:
    """One LoRA layer's concatenated factors for one set of adapters."""

    def __init__(self, module: Any, adapters: Sequence[str]):
        import torch

        base = module.base_layer
        in_features, out_features = int(base.in_features), int(base.out_features)
        a_blocks, b_blocks, self.ranks = [], [], []
        reference = next(iter(module.lora_A.values())).weight
        for name in adapters:
            if name in module.lora_A:
                a = module.lora_A[name].weight
                b = module.lora_B[name].weight * module.scaling[name]
            else:  # this adapter does not target this layer: a zero block keeps the columns aligned
                a = reference.new_zeros((0, in_features))
                b = reference.new_zeros((out_features, 0))
            a_blocks.append(a)
            b_blocks.append(b)
            self.ranks.append(int(a.shape[0]))
        self.a_cat = torch.cat(a_blocks, dim=0)  # [sum r, in]
        self.b_cat = torch.cat(b_blocks, dim=1)  # [out, sum r]
        self.layout = tuple(self.ranks)


class MultiLora:
    """Applies a batch's adapters in every LoRA layer of a peft model with two matmuls per layer."""

    def __init__(self, peft_model: Any):
        self.model = peft_model
        self.layers = [m for _, m in peft_model.named_modules() if _is_lora_linear(m)]
        self._index = {id(m): i for i, m in enumerate(self.layers)}
        self._factors: dict[tuple[str, ...], list[_LayerFactors]] = {}
        self._state: tuple[list[_LayerFactors], dict[tuple[int, ...], "torch.Tensor"]] | None = None
        self._adapters: tuple[str, ...] = ()
        self._rows: list[str] = []
        self._hooks = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._factors.clear()

    def supports(self) -> bool:
        """Whether every LoRA module of the model is plain LoRA on a linear layer."""
        for _, module in self.model.named_modules():
            if hasattr(module, "lora_A") and not _is_lora_linear(module):
                if any(len(getattr(module, attr, {})) for attr in ("lora_A", "lora_embedding_A")):
                    return False
        for layer in self.layers:
            if getattr(layer, "lora_variant", None) or any(getattr(layer, "lora_bias", {}).values()):
                return False
        return bool(self.layers)

    @contextmanager
    def batch(self, rows: Sequence[str]) -> Iterator["MultiLora"]:
        """Within the block, forward passes apply adapter ``rows[i]`` to row i (``__base__``: none)."""
        adapters = tuple(sorted({r for r in rows if r != PEFT_BASE}))
        if adapters and adapters not in self._factors:
            self._factors[adapters] = [_LayerFactors(layer, adapters) for layer in self.layers]
        self._adapters = adapters
        self._state = (self._factors.get(adapters, []), {})
        self.set_rows(rows)
        try:
            with self.model.disable_adapter():
                yield self
        finally:
            self._state = None

    def set_rows(self, rows: Sequence[str]) -> None:
        """Reassign rows (the engine drops finished requests' rows as it goes)."""
        assert self._state is not None, "set_rows outside batch()"
        self._rows = list(rows)
        self._state[1].clear()  # masks depend on the rows

    def _mask(self, layout: tuple[int, ...], like: "torch.Tensor") -> "torch.Tensor":
        """[rows, 1, sum r] with ones on each row's own adapter block."""
        import torch

        assert self._state is not None
        masks = self._state[1]
        if layout not in masks:
            offsets = {}
            start = 0
            for name, rank in zip(self._adapters, layout):
                offsets[name] = (start, start + rank)
                start += rank
            mask = torch.zeros((len(self._rows), 1, start), dtype=like.dtype, device=like.device)
            for i, name in enumerate(self._rows):
                if name in offsets:
                    lo, hi = offsets[name]
                    mask[i, 0, lo:hi] = 1
            masks[layout] = mask
        return masks[layout]

    def delta(self, module: Any, x: "torch.Tensor") -> "torch.Tensor | None":
        """What LoRA module ``module`` adds to its base output for input ``x`` (None: nothing, e.g. base rows only)."""
        index = self._index.get(id(module))
        if index is None or self._state is None or not self._adapters:
            return None
        factors = self._state[0][index]
        if factors.a_cat.shape[0] == 0:
            return None
        low = x.to(factors.a_cat.dtype) @ factors.a_cat.T
        if len(self._adapters) > 1 or PEFT_BASE in self._rows:
            low = low * self._mask(factors.layout, low)
        return low @ factors.b_cat.T

    def _make_hook(self, index: int) -> Any:
        module = self.layers[index]

        def hook(_module: Any, inputs: tuple[Any, ...], output: "torch.Tensor") -> "torch.Tensor | None":
            delta = self.delta(module, inputs[0])
            return None if delta is None else output + delta.to(output.dtype)

        return hook


def _is_lora_linear(module: Any) -> bool:
    base = getattr(module, "base_layer", None)
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and base is not None and hasattr(base, "in_features") and hasattr(base, "out_features")
