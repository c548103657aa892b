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

from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

PEFT_BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch
MAX_FACTOR_SETS = 8  # distinct sets of adapters whose concatenated factors are kept (continuous batching changes the set often)


def _layer_blocks(module: Any, adapters: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor", list[int]]:
    """One layer's A_cat [sum r, in], scaled B_cat [out, sum r] and ranks, adapter by adapter.

    An adapter that does not target the layer (or a plain linear no adapter
    targets) gets a zero-rank block, so the columns stay aligned.
    """
    import torch

    base = getattr(module, "base_layer", module)
    in_features, out_features = int(base.in_features), int(base.out_features)
    lora_a = getattr(module, "lora_A", {})
    reference = next(iter(lora_a.values())).weight if lora_a else base.weight
    a_blocks, b_blocks, ranks = [], [], []
    for name in adapters:
        if name in lora_a:
            a = lora_a[name].weight
            b = module.lora_B[name].weight * module.scaling[name]
        else:
            a = reference.new_zeros((0, in_features), dtype=torch.float32 if not reference.is_floating_point() else reference.dtype)
            b = a.new_zeros((out_features, 0))
        a_blocks.append(a)
        b_blocks.append(b)
        ranks.append(int(a.shape[0]))
    return torch.cat(a_blocks, dim=0), torch.cat(b_blocks, dim=1), ranks


class _Factors:
    """Concatenated factors of one or more linear layers that read the same input, for one set of adapters.

    One layer: A_cat [sum r, in] and B_cat [out, sum r]. Several (q/k/v,
    gate/up): the A_cats stacked and the B_cats block-diagonal, so two products
    give every layer's delta side by side, in the order of their fused base product.
    """

    def __init__(self, modules: Sequence[Any], adapters: Sequence[str]):
        import torch

        blocks = [_layer_blocks(module, adapters) for module in modules]
        self.a_cat = torch.cat([a for a, _, _ in blocks], dim=0)
        self.b_cat = blocks[0][1] if len(blocks) == 1 else torch.block_diag(*[b for _, b, _ in blocks])
        self.layout = tuple(rank for _, _, ranks in blocks for rank in ranks)  # adapter by adapter, layer by layer


class MultiLora:
    """Applies a batch's adapters in every LoRA layer of a peft model with two matmuls per layer (or per fused group)."""

    def __init__(self, peft_model: Any):
        self.model = peft_model
        self.layers = [m for _, m in peft_model.named_modules() if _is_lora_linear(m)]
        self._lora_ids = {id(m) for m in self.layers}
        # adapter set -> (fused group of modules -> its factors), least recently used first, at most MAX_FACTOR_SETS sets
        self._factors: OrderedDict[tuple[str, ...], dict[tuple[int, ...], _Factors | None]] = OrderedDict()
        self._masks: dict[tuple[int, ...], "torch.Tensor"] = {}  # per row assignment
        self._active = False  # inside batch(): deltas apply
        self._adapters: tuple[str, ...] = ()
        self._rows: list[str] = []
        self._hooks = [layer.register_forward_hook(self._make_hook(layer)) for layer in self.layers]

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
    def batch(self, rows: Sequence[str], hooks: bool = True) -> Iterator["MultiLora"]:
        """Within the block, forward passes apply adapter ``rows[i]`` to row i (``__base__``: none).

        ``hooks``: through forward hooks on peft's modules (their own LoRA
        disabled meanwhile); False when the caller asks :meth:`delta` itself (the engine's runner).
        """
        self.set_rows(rows)
        self._active = True
        try:
            if hooks:
                with self.model.disable_adapter():
                    yield self
            else:
                yield self
        finally:
            self._active = False

    def set_rows(self, rows: Sequence[str]) -> None:
        """Assign rows; the per-row masks are rebuilt only when the rows changed (rows come and go between steps)."""
        rows = list(rows)
        if rows == self._rows:
            return
        self._rows = rows
        self._adapters = tuple(sorted({r for r in rows if r != PEFT_BASE}))
        self._masks = {}

    def _mask(self, layout: tuple[int, ...], like: "torch.Tensor") -> "torch.Tensor":
        """[rows, 1, sum r] with ones on each row's own adapter's blocks."""
        import torch

        if layout not in self._masks:
            n = len(self._adapters)
            owner = torch.tensor([k % n for k, rank in enumerate(layout) for _ in range(rank)], device=like.device)
            index = {name: i for i, name in enumerate(self._adapters)}
            row_adapter = torch.tensor([index.get(name, -1) for name in self._rows], device=like.device)
            self._masks[layout] = (owner[None, :] == row_adapter[:, None]).to(like.dtype).unsqueeze(1)
        return self._masks[layout]

    def delta(self, modules: Sequence[Any], x: "torch.Tensor") -> "torch.Tensor | None":
        """What linear layers ``modules`` (all reading ``x``) add to their base outputs, side by side.

        None when nothing: no adapter in the batch, or none of them targets these layers.
        """
        found = self._low(modules, x)
        return None if found is None else found[0] @ found[1].T

    def add_delta(self, out: "torch.Tensor", modules: Sequence[Any], x: "torch.Tensor") -> "torch.Tensor":
        """``out``, the base outputs of ``modules`` (all reading ``x``) side by side, with their deltas added in place.

        One product accumulating into ``out`` (addmm): no delta tensor to
        write and add, which a long prefill paid for as two passes over its widest outputs.
        """
        found = self._low(modules, x)
        if found is not None:
            low, b_cat = found
            out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]).to(out.dtype), b_cat.T.to(out.dtype))
        return out

    def _low(self, modules: Sequence[Any], x: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(x through the A factors, each row masked to its own adapter's; the B factors), or None when no delta applies."""
        if not self._active or not self._adapters:
            return None
        factors = self._factors_of(modules)
        if factors is None or factors.a_cat.shape[0] == 0:
            return None
        low = x.to(factors.a_cat.dtype) @ factors.a_cat.T
        if len(self._adapters) > 1 or PEFT_BASE in self._rows:
            low = low * self._mask(factors.layout, low)
        return low, factors.b_cat

    def _factors_of(self, modules: Sequence[Any]) -> _Factors | None:
        """The concatenated factors of ``modules`` for the current adapter set, built on first use."""
        per_set = self._factors.get(self._adapters)
        if per_set is None:
            while len(self._factors) >= MAX_FACTOR_SETS:
                self._factors.popitem(last=False)
            per_set = self._factors[self._adapters] = {}
        else:
            self._factors.move_to_end(self._adapters)
        key = tuple(id(m) for m in modules)
        if key not in per_set:
            lora = any(id(m) in self._lora_ids for m in modules)
            per_set[key] = _Factors(modules, self._adapters) if lora else None
        return per_set[key]

    def _make_hook(self, module: Any) -> Any:
        def hook(_module: Any, inputs: tuple[Any, ...], output: "torch.Tensor") -> "torch.Tensor | None":
            delta = self.delta((module,), inputs[0])
            return None if delta is None else output + delta.to(output.dtype)

        return hook


def _is_lora_linear(module: Any) -> bool:
    base = getattr(module, "base_layer", None)
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and base is not None and hasattr(base, "in_features") and hasattr(base, "out_features")
