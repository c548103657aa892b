"""Prompt scoring: every position's log-probability under an adapter, the base or an output-space mixture.

Generation only needs the last position's distribution; ``echo`` with
``logprobs`` (lm-evaluation-harness's loglikelihood requests) needs the
probability the model gave each prompt token after the ones before it. That
is one full forward pass per prompt, without a KV cache, through Hugging
Face's forward (peft's ``adapter_names`` for mixed adapters in one batch),
under the engine's lock so it never interleaves with a decoding call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from carve.engine.multi_lora import PEFT_BASE
from carve.engine.picking import combine
from carve.engine.requests import EngineError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# What a prompt is scored under: an adapter's engine name, None for the base, or (adapter or None, weight)
# branches combined by the engine's ``mixture`` rule (log sum_j w_j p_j, weights normalised).
AdapterSpec = Union[Optional[str], tuple[tuple[Optional[str], float], ...]]
MAX_TOKENS_PER_FORWARD = 1024  # rows x padded length per forward pass: bounds the [rows, length, vocab] logits in memory


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``top_k`` most likely tokens at its position (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def top_logprobs(logprobs: "torch.Tensor", token_id: int, top_k: int) -> TokenLogprob:
    """The entry of ``token_id`` in one position's log-distribution [vocab], with its ``top_k`` best tokens."""
    import torch

    top: tuple[tuple[int, float], ...] = ()
    if top_k > 0:
        values, ids = torch.topk(logprobs, min(top_k, logprobs.shape[-1]))
        top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token_id), float(logprobs[token_id]), top)


def branches_of(spec: AdapterSpec) -> tuple[tuple[Optional[str], float], ...]:
    """A spec as (adapter or None, weight) branches: one of weight 1 for a single adapter or the base."""
    if isinstance(spec, tuple):
        if not spec:
            raise EngineError("a mixture needs at least one branch")
        return spec
    return ((spec, 1.0),)


def score_prompts(engine: Any, prompts: Sequence[Sequence[int]], adapters: Sequence[AdapterSpec], top_k: int = 0) -> list[list[Optional[TokenLogprob]]]:
    """Each prompt token's log-probability given the tokens before it, and the ``top_k`` alternatives there.

    ``prompts`` are token ids, used exactly; ``adapters[i]`` names what prompt i
    is scored under. Result i has one entry per token of prompt i; the first is
    None (no token precedes it), as in OpenAI's ``echo`` logprobs.
    """
    import torch

    if len(prompts) != len(adapters):
        raise EngineError(f"{len(prompts)} prompts but {len(adapters)} adapter specs")
    rows: list[tuple[int, list[int], str, float]] = []  # (prompt index, ids, peft adapter name, weight)
    loaded = set(engine.adapters)
    for i, (prompt, spec) in enumerate(zip(prompts, adapters)):
        ids = [int(t) for t in prompt]
        if not ids:
            raise EngineError(f"prompt {i} is empty")
        for name, weight in branches_of(spec):
            if name is not None and name not in loaded:
                raise EngineError(f"prompt {i}: adapter {name!r} is not loaded (loaded: {', '.join(sorted(loaded)) or 'none'})")
            rows.append((i, ids, name or PEFT_BASE, weight))
    per_row: list[Optional["torch.Tensor"]] = [None] * len(rows)  # each row's log-distributions [length - 1, vocab]
    with engine.lock, torch.inference_mode():
        for group in _groups([len(r[1]) for r in rows]):
            for row, logprobs in zip(group, _forward_logprobs(engine, [rows[r] for r in group])):
                per_row[row] = logprobs
    results: list[list[Optional[TokenLogprob]]] = []
    for i, prompt in enumerate(prompts):
        mine = [r for r, row in enumerate(rows) if row[0] == i]
        stacked = torch.stack([per_row[r] for r in mine])  # type: ignore[misc]
        n, length, vocab = stacked.shape
        combined = combine(stacked.reshape(n, -1), "mixture" if n > 1 else "single", [rows[r][3] for r in mine]).reshape(length, vocab)
        ids = [int(t) for t in prompt]
        results.append([None] + [top_logprobs(combined[p], ids[p + 1], top_k) for p in range(length)])
    return results


def _groups(lengths: list[int]) -> list[list[int]]:
    """Row indices in forward-pass groups of at most MAX_TOKENS_PER_FORWARD padded tokens (a longer row goes alone)."""
    groups: list[list[int]] = []
    width = 0
    for index, length in enumerate(lengths):
        if groups and max(width, length) * (len(groups[-1]) + 1) <= MAX_TOKENS_PER_FORWARD:
            groups[-1].append(index)
            width = max(width, length)
        else:
            groups.append([index])
            width = length
    return groups


def _forward_logprobs(engine: Any, rows: list[tuple[int, list[int], str, float]]) -> list["torch.Tensor"]:
    """One right-padded forward pass; each row's log-softmax at positions 0 .. length-2 (those predict a prompt token)."""
    import torch

    model = engine.model
    device = next(model.parameters()).device
    width = max(len(r[1]) for r in rows)
    pad = int(engine.tokenizer.pad_token_id)
    input_ids = torch.tensor([r[1] + [pad] * (width - len(r[1])) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r[1]) + [0] * (width - len(r[1])) for r in rows], device=device)
    names = [r[2] for r in rows]
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "use_cache": False}
    if hasattr(model, "peft_config"):
        kwargs["adapter_names"] = names
    elif any(name != PEFT_BASE for name in names):
        raise EngineError("no adapter is loaded")
    logits = model(**kwargs).logits
    return [torch.log_softmax(logits[k, : len(r[1]) - 1].float(), dim=-1) for k, r in enumerate(rows)]
