"""The engine's own forward pass for Llama- and Gemma-3-architecture models (SmolLM2, gemma3-270m, the test models).

Hugging Face's forward is general, and at 135M parameters its generality is
the cost: per layer and step a dozen module calls, three separate q/k/v
products and two gate/up products, a cache that grows by concatenation, and
LoRA applied through module hooks. This runner does the same arithmetic with
the model's own weights and fewer, larger steps:

- q/k/v and gate/up are one product each (the weights concatenated once; in
  full precision the model's own parameters become views of the fused tensor,
  so nothing is held twice and training the base would still be seen);
- keys and values go into a preallocated cache written in place (carve.engine.kv_cache);
- LoRA deltas come from the engine's concatenated-factor MultiLora, asked
  directly instead of through forward hooks;
- optionally the frozen base's products run on copies of its weights in
  another format: bf16 (half the bytes; a CPU with AVX-512 BF16 or AMX runs
  the product natively, 2-4x faster than fp32 at 135M-270M parameters) or
  int8 (per output channel; activations quantized per token at run time, an
  exact int32 product). Activations, norms, attention, the KV cache and LoRA
  stay in the model's own dtype.

Gemma 3 differs in its arithmetic, not its shape: a scaled embedding, norms
that multiply by 1 + weight, q/k norms per head, norms after attention and the
MLP, gelu, RoPE per layer type and sliding-window layers. Its cache keeps every
column and the window is a mask over *positions* (not columns), so a k-shot
prompt's shared prefix, padded apart from each row's own tokens, sees exactly
the window it would see alone: prefix sharing stays exact.

Anything else (another architecture, 4-bit bitsandbytes layers, biases, logit
soft-capping in attention) is refused by :func:`unsupported_reason` and the
engine keeps Hugging Face's forward.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, Sequence

from carve.engine.kv_cache import KVCache

if TYPE_CHECKING:  # pragma: no cover
    import torch

WeightFormat = Literal["native", "bf16", "int8"]
WEIGHT_FORMATS: tuple[str, ...] = ("native", "bf16", "int8")


class Part(NamedTuple):
    """One batch of a forward pass: ``input_ids`` [rows, q] run after ``cache``'s columns.

    ``attention`` [rows, cached + q] marks real tokens (0 = padding),
    ``positions`` [rows, q] are their position ids; the logits of the last
    ``logit_columns`` positions come back (more than one: a draft checked).
    """

    input_ids: "torch.Tensor"
    attention: "torch.Tensor"
    positions: "torch.Tensor"
    cache: KVCache
    logit_columns: int = 1


class LoraDeltas(Protocol):
    """What the runner needs of MultiLora: the deltas of linear layers reading one input added to their base outputs."""

    def add_delta(self, out: "torch.Tensor", modules: Sequence[Any], x: "torch.Tensor") -> "torch.Tensor": ...


ACTIVATIONS = {"llama": "silu", "gemma3_text": "gelu_pytorch_tanh"}
SMALL_PRODUCT_ROWS = 256  # up to this many rows a product runs as (W @ x^T)^T (see linear); measured faster up to 256


def unsupported_reason(model: Any) -> str | None:
    """Why the runner cannot run this model (None: it can)."""
    import torch

    base = _causal_lm(model)
    config = base.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ACTIVATIONS:
        return f"architecture {model_type!r} (the runner knows {', '.join(ACTIVATIONS)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear layers with biases"
    activation = getattr(config, "hidden_act", None) if model_type == "llama" else getattr(config, "hidden_activation", None)
    if activation != ACTIVATIONS[model_type]:
        return f"activation {activation!r}"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    for layer in base.model.layers:
        for module in _layer_linears(layer).values():
            if type(module) is not torch.nn.Linear or not module.weight.is_floating_point():
                return f"{type(module).__name__} base layers (quantized or custom)"
    return None


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_linear(module: Any) -> Any:
    """The frozen nn.Linear under a peft LoRA wrapper (or the module itself)."""
    return getattr(module, "base_layer", module)


def _layer_linears(layer: Any) -> dict[str, Any]:
    attn, mlp = layer.self_attn, layer.mlp
    names = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj, "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    return {key: _base_linear(module) for key, module in names.items()}


class _Product:
    """x @ W^T for one (possibly fused) weight: in the model's dtype, on bf16 weights or on int8 weights.

    bf16: x rounded to bf16, a bf16 product accumulating in fp32, the result
    back in x's dtype. int8: W per output channel and x per row (token) to int8,
    an exact int32 product, then both scales. A row's scale is its own, so a
    row's result never depends on the other rows of the batch (the engine's
    batch invariance holds; oneDNN's bf16 product is row-invariant too).
    """

    def __init__(self, weight: "torch.Tensor", weight_format: WeightFormat):
        import torch

        self.out_features = int(weight.shape[0])
        self.weight: "torch.Tensor | None" = None
        if weight_format == "bf16":
            self.weight = weight.detach().to(torch.bfloat16).contiguous()
        elif weight_format == "int8":
            w = weight.detach().float()
            self.scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
            self.int8_t = (w / self.scale[:, None]).round().clamp(-127, 127).to(torch.int8).t().contiguous()  # [in, out]
        else:
            self.weight = weight

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.weight is not None:
            if self.weight.dtype == x.dtype:
                return linear(x, self.weight)
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)  # bf16 copies
        rows = x.reshape(-1, x.shape[-1]).float()
        row_scale = torch.linalg.vector_norm(rows, ord=math.inf, dim=1, keepdim=True).div_(127.0).clamp_(min=1e-12)
        quantized = torch.div(rows, row_scale).round_().to(torch.int8)
        out = torch.mul(torch._int_mm(quantized, self.int8_t), row_scale).mul_(self.scale)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def linear(x: "torch.Tensor", weight: "torch.Tensor") -> "torch.Tensor":
    """x @ W^T; on the CPU in fp32, up to SMALL_PRODUCT_ROWS rows as (W @ x^T)^T.

    For a decode step's few rows, MKL's product with the rows as its
    transposed right operand read the weights 1.5-5x faster on this CPU than
    ``F.linear`` (docs/results), and a lone row runs as two (the second zeros):
    as one it takes a matrix-vector path as slow as ``F.linear``'s.
    """
    import torch

    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count > SMALL_PRODUCT_ROWS or x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.nn.functional.linear(x, weight)
    if count == 1:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return (weight @ rows.T)[:, :count].T.contiguous().view(*x.shape[:-1], weight.shape[0])


def _fused(modules: list[Any], weight_format: WeightFormat) -> _Product:
    """One product for several linears of the same input; in full precision their weights become views of it."""
    import torch

    with torch.no_grad():
        fused = torch.cat([m.weight.detach() for m in modules], dim=0).contiguous()
        if weight_format == "native":
            start = 0
            for m in modules:
                rows = m.weight.shape[0]
                m.weight.data = fused[start : start + rows]
                start += rows
    return _Product(fused, weight_format)


class _Layer:
    """One decoder layer's fused products, norm weights and attention kind.

    Norm weights are as F.rms_norm takes them: Gemma's ``1 + weight`` is folded
    in once. Llama has no norm after attention or the MLP (None) and calls its
    pre-MLP norm ``post_attention_layernorm``.
    """

    def __init__(self, layer: Any, weight_format: WeightFormat, gemma: bool, layer_type: str | None, heads: int, kv_heads: int):
        linears = _layer_linears(layer)
        self.module = layer  # peft may wrap its linears later: LoRA modules are looked up at each call
        self.qkv = _fused([linears["q"], linears["k"], linears["v"]], weight_format)
        self.o = _Product(linears["o"].weight.detach(), weight_format)
        self.gate_up = _fused([linears["gate"], linears["up"]], weight_format)
        self.down = _Product(linears["down"].weight.detach(), weight_format)
        self.layer_type = layer_type
        self.qk_norm: "torch.Tensor | None" = None
        self.post_attention_norm: "torch.Tensor | None" = None
        self.post_mlp_norm: "torch.Tensor | None" = None
        if gemma:
            import torch

            attn = layer.self_attn
            self.input_norm = _gemma_norm(layer.input_layernorm.weight)
            self.post_attention_norm = _gemma_norm(layer.post_attention_layernorm.weight)
            self.pre_mlp_norm = _gemma_norm(layer.pre_feedforward_layernorm.weight)
            self.post_mlp_norm = _gemma_norm(layer.post_feedforward_layernorm.weight)
            q_norm, k_norm = _gemma_norm(attn.q_norm.weight), _gemma_norm(attn.k_norm.weight)
            self.qk_norm = torch.cat([q_norm.expand(heads, -1), k_norm.expand(kv_heads, -1)])  # [heads + kv_heads, head_dim]
        else:
            self.input_norm = layer.input_layernorm.weight
            self.pre_mlp_norm = layer.post_attention_layernorm.weight


def _gemma_norm(weight: "torch.Tensor") -> "torch.Tensor":
    return (1.0 + weight.detach().float()).to(weight.dtype)


class Runner:
    """Prefill and decode steps of a Llama- or Gemma-3-architecture causal LM, LoRA rows included."""

    def __init__(self, model: Any, weight_format: WeightFormat = "native"):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the engine's runner cannot run this model: {reason}")
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {weight_format!r}: use {', '.join(WEIGHT_FORMATS)}")
        lm = _causal_lm(model)
        config = lm.config
        self.gemma = config.model_type == "gemma3_text"
        self.weight_format = weight_format
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.embed = lm.model.embed_tokens.weight
        self.embed_scale = float(lm.model.embed_tokens.embed_scale) if self.gemma else None
        self.attention_scale = float(config.query_pre_attn_scalar) ** -0.5 if self.gemma else None  # None: 1/sqrt(head_dim)
        self.sliding_window = int(config.sliding_window) if self.gemma else None
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.rotary = lm.model.rotary_emb
        self.final_norm = _gemma_norm(lm.model.norm.weight) if self.gemma else lm.model.norm.weight
        layer_types = list(config.layer_types) if self.gemma else [None] * len(lm.model.layers)
        self.layers = [_Layer(layer, weight_format, self.gemma, kind, self.heads, self.kv_heads) for layer, kind in zip(lm.model.layers, layer_types)]
        self.layer_types = sorted(set(layer_types), key=str)
        self.qk_v_split = [(self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim]
        self.lm_head = _Product(lm.lm_head.weight.detach(), weight_format)
        self.dtype = self.embed.dtype
        self.device = self.embed.device

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def forward_parts(self, parts: Sequence[Part], lora: LoraDeltas | None) -> list["torch.Tensor"]:
        """Several batches in one pass, each after its own cache: each part's logits, [rows, vocab] or [rows, logit_columns, vocab].

        Every real token of every part goes through each linear product together,
        so the weights are read once per layer for all of them (a decode step and
        a prefill chunk cost one pass, not two); left padding skips the products
        (a batch of prompts of unequal length costs its tokens, not rows x the
        longest). Attention runs per part, on its own cache and mask, padding
        included (zeros). LoRA sees one row per real token, parts in order, each
        part's tokens row by row (what :meth:`token_rows` lists).
        """
        import torch
        import torch.nn.functional as F

        sizes = []
        for part in parts:
            rows, q_len = part.input_ids.shape
            if part.attention.shape[1] != part.cache.length + q_len:
                raise RuntimeError(f"attention mask covers {part.attention.shape[1]} columns, the cache and input {part.cache.length + q_len}")
            sizes.append(rows * q_len)
        real = torch.cat([_real_inputs(part.attention, part.input_ids.shape[1]).reshape(-1) for part in parts])  # [tokens] of the padded layout
        packed = None if bool(real.all()) else real.nonzero().squeeze(1)  # None: no padding to skip
        x = F.embedding(_take(torch.cat([part.input_ids.reshape(-1) for part in parts]), packed), self.embed).unsqueeze(1)  # [real tokens, 1, hidden]
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        rope = {kind: tuple(_take(t, packed) for t in self._rope(x, parts, kind)) for kind in self.layer_types}
        by_row = [_causal_rows(p.attention, p.cache.length, p.input_ids.shape[1]) for p in parts]
        masks = {  # None: attended row by row over each row's real keys (no mask over the padded square)
            kind: [None if r else _attention_mask(p.attention, p.cache.length, p.input_ids.shape[1], p.positions, self._window(kind)) for p, r in zip(parts, by_row)]
            for kind in self.layer_types
        }
        tokens, padded = x.shape[0], real.shape[0]
        for index, layer in enumerate(self.layers):
            attn, mlp = layer.module.self_attn, layer.module.mlp
            cos, sin = rope[layer.layer_type]
            h = self._norm(x, self.hidden, layer.input_norm)
            qkv = _with_lora(layer.qkv(h), lora, (attn.q_proj, attn.k_proj, attn.v_proj), h)
            qk, v = qkv.split(self.qk_v_split, dim=-1)
            qk = qk.view(tokens, self.heads + self.kv_heads, self.head_dim)
            if layer.qk_norm is not None:  # Gemma: each head's own q or k norm weights, [heads + kv_heads, head_dim]
                qk = self._norm(qk, self.head_dim, None) * layer.qk_norm
            qk = qk * cos + _rotate_half(qk) * sin  # RoPE on queries and keys at once
            queries, keys = _put(qk, packed, padded).split((self.heads, self.kv_heads), dim=1)
            v = _put(v.reshape(tokens, self.kv_heads, self.head_dim), packed, padded)
            outputs = []
            for part, mask, q_slice, k_slice, v_slice in zip(parts, masks[layer.layer_type], queries.split(sizes), keys.split(sizes), v.split(sizes)):
                rows, q_len = part.input_ids.shape
                q = q_slice.reshape(rows, q_len, self.heads, self.head_dim).transpose(1, 2)
                cached_keys, cached_values = part.cache.write(
                    index, k_slice.reshape(rows, q_len, self.kv_heads, self.head_dim).transpose(1, 2), v_slice.reshape(rows, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
                )
                if mask is None:
                    a = _rows_attention(
                        q, cached_keys, cached_values, part.attention, self._window(layer.layer_type), self.attention_scale, self.heads != self.kv_heads
                    )
                else:
                    a = F.scaled_dot_product_attention(
                        q, cached_keys, cached_values, attn_mask=mask, scale=self.attention_scale, enable_gqa=self.heads != self.kv_heads
                    )
                outputs.append(a.transpose(1, 2).reshape(rows * q_len, self.heads * self.head_dim))
            a = _take(torch.cat(outputs), packed).unsqueeze(1)
            out = _with_lora(layer.o(a), lora, (attn.o_proj,), a)
            x = x + (out if layer.post_attention_norm is None else self._norm(out, self.hidden, layer.post_attention_norm))
            h = self._norm(x, self.hidden, layer.pre_mlp_norm)
            gate_up = _with_lora(layer.gate_up(h), lora, (mlp.gate_proj, mlp.up_proj), h)
            gate, up = gate_up.chunk(2, dim=-1)
            inner = (F.gelu(gate, approximate="tanh") if self.gemma else F.silu(gate)) * up
            out = _with_lora(layer.down(inner), lora, (mlp.down_proj,), inner)
            x = x + (out if layer.post_mlp_norm is None else self._norm(out, self.hidden, layer.post_mlp_norm))
        last, start = [], 0
        for part, size in zip(parts, sizes):
            rows, q_len = part.input_ids.shape
            part.cache.advance(q_len)
            ends = torch.arange(start + q_len, start + size + 1, q_len, device=x.device)  # one past each row's last position
            last.append((ends[:, None] - torch.arange(part.logit_columns, 0, -1, device=x.device)).reshape(-1))
            start += size
        logits = self.lm_head(self._norm(_put(x, packed, padded)[torch.cat(last), 0], self.hidden, self.final_norm))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        split = logits.split([part.input_ids.shape[0] * part.logit_columns for part in parts])
        return [t if part.logit_columns == 1 else t.view(part.input_ids.shape[0], part.logit_columns, -1) for t, part in zip(split, parts)]

    def _norm(self, x: "torch.Tensor", size: int, weight: "torch.Tensor | None") -> "torch.Tensor":
        """RMS norm over the last ``size`` features (Gemma's in fp32, then back to the input's dtype, as its own)."""
        import torch
        import torch.nn.functional as F

        if self.gemma and x.dtype != torch.float32:
            return F.rms_norm(x.float(), (size,), None if weight is None else weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, (size,), weight, self.eps)

    def _rope(self, x: "torch.Tensor", parts: Sequence[Part], layer_type: str | None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """cos and sin [tokens, 1, head_dim] of every token of every part, for one layer type's RoPE."""
        import torch

        turns = [self.rotary(x, part.positions) if layer_type is None else self.rotary(x, part.positions, layer_type) for part in parts]
        cos = torch.cat([c.reshape(-1, self.head_dim) for c, _ in turns]).unsqueeze(1)
        sin = torch.cat([s.reshape(-1, self.head_dim) for _, s in turns]).unsqueeze(1)
        return cos, sin

    def _window(self, layer_type: str | None) -> int | None:
        return self.sliding_window if layer_type == "sliding_attention" else None

    @staticmethod
    def token_rows(parts: Sequence[tuple["torch.Tensor", "torch.Tensor", Sequence[str]]]) -> list[str]:
        """The adapter of each real token :meth:`forward_parts` runs, from each part's input ids, attention mask and row adapters."""
        rows = []
        for ids, attention, adapters in parts:
            real = _real_inputs(attention, ids.shape[1]).tolist()
            rows += [adapter for adapter, flags in zip(adapters, real) for flag in flags if flag]
        return rows


def _real_inputs(attention: "torch.Tensor", q_len: int) -> "torch.Tensor":
    """[rows, q] booleans: which input tokens are real (not left padding), from the mask's last ``q_len`` columns."""
    return attention[:, attention.shape[1] - q_len :].bool()


def _take(t: "torch.Tensor", packed: "torch.Tensor | None") -> "torch.Tensor":
    """The real tokens' rows of ``t`` (laid out as the padded inputs); all of them when nothing is padding."""
    return t if packed is None else t.index_select(0, packed)


def _put(t: "torch.Tensor", packed: "torch.Tensor | None", padded: int) -> "torch.Tensor":
    """The real tokens' rows back in the padded layout, zeros at the padding (which attention masks out)."""
    if packed is None:
        return t
    out = t.new_zeros((padded, *t.shape[1:]))
    return out.index_copy_(0, packed, t)


def _with_lora(out: "torch.Tensor", lora: LoraDeltas | None, modules: Sequence[Any], x: "torch.Tensor") -> "torch.Tensor":
    return out if lora is None else lora.add_delta(out, modules, x)


def _rotate_half(x: "torch.Tensor") -> "torch.Tensor":
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


CAUSAL_ROWS_MIN_TOKENS = 64  # below this one masked product for all rows costs less than a call per row


def _causal_rows(attention: "torch.Tensor", cached: int, q_len: int) -> bool:
    """Whether a part's attention runs row by row (:func:`_rows_attention`) rather than under the masked square.

    Its new tokens are left-padded (each row: padding, then its tokens) and
    long enough that the square's waste (its upper half and its padding, which
    the CPU's kernel computes under an explicit mask) outweighs a call per row;
    and what is cached before them (a shared prompt prefix, an earlier chunk)
    is no longer than they are, since each cached key costs a query of its own there.
    """
    if q_len < CAUSAL_ROWS_MIN_TOKENS:
        return False
    new = attention[:, cached:]
    if not bool((new[:, 1:] >= new[:, :-1]).all()):
        return False
    return int(attention[:, :cached].sum()) <= int(new.sum())


def _rows_attention(
    q: "torch.Tensor", keys: "torch.Tensor", values: "torch.Tensor", attention: "torch.Tensor", window: int | None, scale: float | None, gqa: bool
) -> "torch.Tensor":
    """Each row's causal attention over its real keys only (padding cut away); zeros at padding queries.

    A row's real keys, in order, are its whole sequence so far (a key's
    position is the count of real columns before it), so a row is one causal
    square over them. Under ``is_causal`` the CPU's kernel skips the upper
    half; its alignment is the square's top left, so the cached keys before
    the new queries (a shared prefix) get queries of their own, zeros, whose
    outputs are dropped. A sliding window (a key fewer than ``window``
    positions before its query) is run in blocks of ``window`` queries, each
    over the keys it can see, so a long row computes a band rather than its square.
    """
    import torch
    import torch.nn.functional as F

    out = q.new_zeros(q.shape)
    rows, heads, q_len, head_dim = q.shape
    width = keys.shape[2]
    for row in range(rows):
        mask = attention[row]
        n, total = int(mask[width - q_len :].sum()), int(mask.sum())  # its new tokens (the last columns), all its tokens
        if n <= 0:
            continue
        if bool(mask[width - total :].all()):  # one run of real columns at the end: a view
            kr, vr = keys[row : row + 1, :, width - total :], values[row : row + 1, :, width - total :]
        else:  # a shared prefix, then padding, then the row's own tokens: gathered
            real = mask.nonzero().squeeze(1)
            kr, vr = keys[row : row + 1].index_select(2, real), values[row : row + 1].index_select(2, real)
        qr = q[row : row + 1, :, q_len - n :]
        if total > n:
            qr = torch.cat([qr.new_zeros(1, heads, total - n, head_dim), qr], dim=2)
        block = total if window is None else window
        for first in range(0, total, block):
            last = min(first + block, total)
            if last <= total - n:  # only the cached keys' stand-in queries
                continue
            if first == 0:  # the first block sees every key before it: plain causal
                a = F.scaled_dot_product_attention(qr[:, :, :last], kr[:, :, :last], vr[:, :, :last], is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                low = first - block + 1
                queries, seen = torch.arange(first, last, device=q.device), torch.arange(low, last, device=q.device)
                distance = queries[:, None] - seen[None, :]
                a = F.scaled_dot_product_attention(
                    qr[:, :, first:last], kr[:, :, low:last], vr[:, :, low:last], attn_mask=(distance >= 0) & (distance < block), scale=scale, enable_gqa=gqa
                )
            keep = max(first, total - n)  # the block's first own query
            out[row : row + 1, :, q_len - (total - keep) : q_len - (total - last)] = a[:, :, keep - first :]
    return out


def _attention_mask(attention: "torch.Tensor", cached: int, q_len: int, positions: "torch.Tensor", window: int | None = None) -> "torch.Tensor":
    """[rows, 1, q, cached + q] booleans: real keys at or before each query (and each query itself).

    ``window``: a sliding-window layer's keys are also fewer than ``window``
    positions before the query. Positions, not columns: a key's position is the
    count of real columns before it (the engine's position ids), so padding
    between a shared prefix and a row's own tokens does not narrow the window.
    A padding query sees only itself, so its (unused) output stays finite and
    no NaN reaches the cache.
    """
    import torch

    valid = attention.bool()[:, None, None, :]
    if q_len == 1 and window is None:
        return valid
    keys = torch.arange(cached + q_len, device=attention.device)
    queries = cached + torch.arange(q_len, device=attention.device)
    causal = keys[None, :] <= queries[:, None]
    itself = keys[None, :] == queries[:, None]
    allowed = valid & causal
    if window is not None:
        key_positions = attention.cumsum(-1) - 1  # [rows, cached + q]
        near = positions[:, :, None] - key_positions[:, None, :] < window  # [rows, q, cached + q]
        allowed = allowed & near[:, None]
    return allowed | itself
