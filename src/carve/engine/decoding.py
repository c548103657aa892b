"""The decoding engine: the one primitive that specialize/, the router and serving share.

A request fans out into weighted *branches*, each a (prompt, adapter) pair. All
branches of all requests in a batch are decoded together in one forward pass
per step (peft mixed-adapter batches, left padding, a shared KV cache). At each
step every request's branch distributions are combined by its rule into one
next token, which every branch of that request then appends:

- ``single``: one branch, its own distribution;
- ``mixture``: sum_j w_j p_j(y) with the weights normalised (retrieval
  marginalization over documents, or a mixture of experts);
- ``contrast``: log p_a(y) - w_b log p_b(y) over the tokens with
  p_a(y) >= alpha * max p_a (contrastive decoding, Li et al. 2023).

Sampling uses one torch.Generator per request, so a request's tokens never
depend on what else shares its batch.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from carve.engine.adapter_checks import check_adapter_files, check_adapter_fits
from carve.engine.multi_lora import PEFT_BASE, MultiLora
from carve.engine.runner import LlamaRunner, WeightFormat, unsupported_reason
from carve.engine.text import encode_prompt

if TYPE_CHECKING:  # pragma: no cover
    import torch

Rule = Literal["single", "mixture", "contrast"]
FinishReason = Literal["stop", "length", "eos"]
# How a call's forward passes run: the engine's own runner (carve.engine.runner), Hugging Face's
# forward with the concatenated-factor LoRA hooks, or Hugging Face's forward with peft's mixed batches.
Path_ = Literal["runner", "multi", "peft"]


class EngineError(ValueError):
    """A request or adapter the engine refuses; the message says why."""


@dataclass(frozen=True)
class Branch:
    """One prompt decoded under one adapter (None = the base model)."""

    prompt: str | Sequence[int]
    adapter: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    alpha: float = 0.1  # contrast: plausibility threshold relative to the expert's top token
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)
    # OpenAI's: subtract frequency_penalty * count(t) + presence_penalty * [count(t) > 0] over the tokens generated so far,
    # add logit_bias[t]; all on the step's combined scores, before temperature. Zeros and () change nothing.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.alpha <= 1:
            raise EngineError(f"alpha must be in [0, 1], got {self.alpha}")
        if not all(math.isfinite(v) for v in (self.frequency_penalty, self.presence_penalty, *(b for _, b in self.logit_bias))):
            raise EngineError("penalties and logit_bias values must be finite")

    @property
    def adjusts_scores(self) -> bool:
        """Whether penalties or a logit bias change the scores a token is picked from."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


@dataclass(frozen=True)
class GenerationRequest:
    branches: tuple[Branch, ...]
    rule: Rule = "single"
    sampling: Sampling = field(default_factory=Sampling)
    record_scores: bool = False  # keep every step's combined score vector (for inspection and tests)

    def __post_init__(self) -> None:
        n = len(self.branches)
        if n == 0:
            raise EngineError("a request needs at least one branch")
        if self.rule == "single" and n != 1:
            raise EngineError(f"rule 'single' takes exactly one branch, got {n}")
        if self.rule == "contrast" and n != 2:
            raise EngineError(f"rule 'contrast' takes two branches (expert, amateur), got {n}")
        if self.rule == "mixture" and any(b.weight <= 0 or not math.isfinite(b.weight) for b in self.branches):
            raise EngineError("mixture weights must be positive and finite")
        if self.rule not in ("single", "mixture", "contrast"):
            raise EngineError(f"unknown rule {self.rule!r}: use single, mixture or contrast")

    @classmethod
    def single(cls, prompt: str | Sequence[int], adapter: str | None = None, sampling: Sampling | None = None) -> "GenerationRequest":
        return cls((Branch(prompt, adapter),), "single", sampling or Sampling())


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    step_scores: list["torch.Tensor"] | None = None  # combined log-space scores per step, when recorded


@dataclass(frozen=True)
class StreamEvent:
    """New text of one request after a decoding step; ``finish_reason`` set on its last event."""

    index: int
    delta: str
    token_id: int | None
    finish_reason: FinishReason | None = None
    scores: "torch.Tensor | None" = None  # the step's combined scores, when the request records them


def combine(logprobs: "torch.Tensor", rule: Rule, weights: Sequence[float], alpha: float = 0.1) -> "torch.Tensor":
    """Combine branch log-probabilities [n_branches, vocab] into one score vector [vocab].

    The scores are log-space: for ``single`` and ``mixture`` a log-distribution,
    for ``contrast`` the contrastive score with implausible tokens at -inf.
    """
    import torch

    if rule == "single":
        return logprobs[0]
    if rule == "mixture":
        w = torch.tensor(weights, dtype=logprobs.dtype, device=logprobs.device)
        log_w = torch.log(w / w.sum()).unsqueeze(1)
        return torch.logsumexp(logprobs + log_w, dim=0)
    if rule == "contrast":
        expert, amateur = logprobs[0], logprobs[1]
        plausible = expert >= expert.max() + math.log(alpha) if alpha > 0 else torch.ones_like(expert, dtype=torch.bool)
        score = expert - weights[1] * amateur
        return torch.where(plausible, score, torch.full_like(score, -math.inf))
    raise EngineError(f"unknown rule {rule!r}")


def adjust_scores(scores: "torch.Tensor", sampling: Sampling, generated: Sequence[int] = ()) -> "torch.Tensor":
    """``scores`` [vocab] with the request's penalties over ``generated`` (its tokens so far) and its logit bias applied.

    Returns ``scores`` itself when the sampling has neither, so default requests decode exactly as before.
    """
    import torch

    if not sampling.adjusts_scores:
        return scores
    adjusted = scores.clone()
    if generated and (sampling.frequency_penalty or sampling.presence_penalty):
        ids, counts = torch.unique(torch.tensor(list(generated), device=scores.device), return_counts=True)
        penalty = sampling.frequency_penalty * counts.to(scores.dtype) + sampling.presence_penalty
        adjusted[ids] -= penalty
    if sampling.logit_bias:
        ids = torch.tensor([t for t, _ in sampling.logit_bias], device=scores.device)
        adjusted[ids] += torch.tensor([b for _, b in sampling.logit_bias], dtype=scores.dtype, device=scores.device)
    return adjusted


def pick_token(scores: "torch.Tensor", sampling: Sampling, generator: "torch.Generator | None", generated: Sequence[int] = ()) -> int:
    """Greedy argmax, or a temperature / top-p sample drawn with the request's own generator.

    ``generated``: the request's tokens so far, for its frequency and presence penalties.
    """
    import torch

    scores = adjust_scores(scores, sampling, generated)
    if sampling.temperature == 0:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = _nucleus_candidates(probs, sampling.top_p)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < sampling.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus_candidates(probs: "torch.Tensor", top_p: float, first: int = 1024) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The most probable tokens, sorted, enough of them to reach ``top_p``: the whole nucleus.

    Sorting a 50k vocabulary at every step was a fifth of sampling time; the
    nucleus almost always lies in the top thousand, so take the top-k and widen
    only when it falls short of ``top_p``.
    """
    import torch

    k = min(first, probs.shape[-1])
    while True:
        top, order = torch.topk(probs, k)
        if k == probs.shape[-1] or float(top.sum()) >= top_p:
            return top, order
        k = min(4 * k, probs.shape[-1])


class _TextTracker:
    """Decodes one request's tokens incrementally, applying stop strings.

    Streaming withholds text that could still become a stop string and a
    trailing partial UTF-8 character, so streamed deltas concatenate to exactly
    the non-streamed text.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string has appeared (text cut before it)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text = self.text[:at]
                return True
        return False

    def delta(self, final: bool) -> str:
        safe = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            for stop in self.stop:
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out


@dataclass
class _Row:
    request: int
    ids: list[int]
    adapter: str


class Engine:
    """Batched branch decoding over one base model with any number of LoRA adapters.

    ``model`` is a causal LM (or a peft model wrapping one); adapters are loaded
    with :meth:`load_adapter`. Calls are serialised by a lock: one batch at a time.
    ``weight_format`` int8 runs the frozen base's products on int8 weights (CPU;
    needs the runner); ``runner`` False keeps Hugging Face's forward everywhere.
    """

    def __init__(
        self, model: Any, tokenizer: Any, base_label: str = "base model", multi_lora: bool = True,
        weight_format: WeightFormat = "native", runner: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.base_label = base_label
        self.lock = threading.RLock()
        self.use_multi_lora = multi_lora  # concatenated-factor LoRA (carve.engine.multi_lora) when it applies
        self._multi: Any = None
        self.share_prefixes = not _has_sliding_window(model)
        self.min_shared_prefix = 16  # below this an extra forward pass costs more than it saves
        self.shared_prefix_tokens = 0  # prompt tokens not recomputed thanks to shared prefixes
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self.runner = self._build_runner(weight_format) if runner else None
        if weight_format != "native" and self.runner is None:
            raise EngineError(f"weight format {weight_format!r} needs the engine's runner, which is off")

    def _build_runner(self, weight_format: WeightFormat) -> LlamaRunner | None:
        """The engine's own forward when the model allows it; None keeps Hugging Face's."""
        reason = unsupported_reason(self.model)
        if reason is None:
            return LlamaRunner(self.model, weight_format)
        if weight_format != "native":
            raise EngineError(f"weight format {weight_format!r} needs the engine's runner, which cannot run this model: {reason}")
        return None

    # -- adapters ---------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        config = getattr(self.model, "peft_config", None)
        return sorted(config) if config else []

    def base_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear module of the base, by module name."""
        base = base_model(self.model)
        shapes: dict[str, tuple[int, int]] = {}
        for name, module in base.named_modules():
            if ".lora_" in name or name.endswith(".base_layer"):
                continue  # peft's own sub-modules
            inner = getattr(module, "base_layer", module)
            if hasattr(inner, "in_features") and hasattr(inner, "out_features"):
                shapes[name] = (int(inner.out_features), int(inner.in_features))
        return shapes

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT adapter folder under ``name``, after checking that it fits this base."""
        if name == PEFT_BASE or not name:
            raise EngineError(f"{name!r} is reserved and cannot name an adapter")
        with self.lock:
            if name in self.adapters:
                raise EngineError(f"adapter {name!r} is already loaded")
            info = check_adapter_files(Path(path))
            check_adapter_fits(info, self.base_linear_shapes(), base_label=self.base_label)
            from peft import PeftModel

            if hasattr(self.model, "peft_config"):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()
            self._reset_multi_lora()

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise EngineError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.adapters) or 'none'})")
            if len(self.adapters) == 1:
                # peft cannot delete its last adapter: unwrap back to the bare base.
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            self._reset_multi_lora()

    def _reset_multi_lora(self) -> None:
        """Rebuild the concatenated-factor LoRA after the set of adapters changed."""
        if self._multi is not None:
            self._multi.close()
            self._multi = None
        if self.use_multi_lora and hasattr(self.model, "peft_config"):
            multi = MultiLora(self.model)
            if multi.supports():
                self._multi = multi
            else:
                multi.close()

    # -- decoding ---------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Decode every request to completion; one Completion per request, in order."""
        ids: list[list[int]] = [[] for _ in requests]
        reasons: list[FinishReason | None] = [None] * len(requests)
        texts = [""] * len(requests)
        prompt_tokens = [0] * len(requests)
        scores: list[list[Any] | None] = [[] if r.record_scores else None for r in requests]
        for event in self._decode(requests, prompt_tokens):
            texts[event.index] += event.delta
            if event.token_id is not None:
                ids[event.index].append(event.token_id)
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
            if event.scores is not None:
                scores[event.index].append(event.scores)  # type: ignore[union-attr]
        return [Completion(texts[i], ids[i], reasons[i] or "length", prompt_tokens[i], scores[i]) for i in range(len(requests))]

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Yield each request's new text after every decoding step (token streaming)."""
        yield from self._decode(requests, [0] * len(requests))

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt, by the text rules every layer shares (carve.engine.text)."""
        return encode_prompt(self.tokenizer, prompt)

    def _eos_ids(self) -> set[int]:
        eos: set[int] = set()
        candidates: list[Any] = [getattr(self.tokenizer, "eos_token_id", None)]
        gen_config = getattr(self.model, "generation_config", None)
        if gen_config is not None:
            candidates.append(gen_config.eos_token_id)
        for candidate in candidates:
            if isinstance(candidate, int):
                eos.add(candidate)
            elif isinstance(candidate, (list, tuple)):
                eos.update(int(c) for c in candidate)
        return eos

    def _check_adapters(self, requests: Sequence[GenerationRequest]) -> None:
        loaded = set(self.adapters)
        for i, request in enumerate(requests):
            for branch in request.branches:
                if branch.adapter is not None and branch.adapter not in loaded:
                    raise EngineError(
                        f"request {i}: adapter {branch.adapter!r} is not loaded (loaded: {', '.join(sorted(loaded)) or 'none'})"
                    )

    def _decode(self, requests: Sequence[GenerationRequest], prompt_tokens: list[int]) -> Iterator[StreamEvent]:
        import torch

        if not requests:
            return
        self._check_adapters(requests)
        with self.lock, torch.inference_mode():
            rows: list[_Row] = []
            for i, request in enumerate(requests):
                for branch in request.branches:
                    token_ids = self.encode(branch.prompt)
                    if not token_ids:
                        raise EngineError(f"request {i}: empty prompt")
                    rows.append(_Row(i, token_ids, branch.adapter or PEFT_BASE))
                prompt_tokens[i] = sum(len(r.ids) for r in rows if r.request == i)
            shared = self._shared_prefix(rows)
            batch = _Batch.left_padded(rows, int(self.tokenizer.pad_token_id), _model_device(self.model), shared)
            path = self._path()
            capacity = shared + batch.input_ids.shape[1] + max(r.sampling.max_new_tokens for r in requests)
            cache = self.runner.new_cache(capacity) if path == "runner" else _new_cache(self.model)  # type: ignore[union-attr]
            multi = self._multi
            with multi.batch(batch.adapters) if multi is not None else contextlib.nullcontext():
                yield from self._steps(requests, batch, cache, path)

    def _path(self) -> Path_:
        """The runner where it applies (every adapter served by MultiLora, or none loaded), else Hugging Face's forward."""
        has_adapters = hasattr(self.model, "peft_config")
        if self.runner is not None and (self._multi is not None or not has_adapters):
            return "runner"
        return "multi" if self._multi is not None else "peft"

    def _shared_prefix(self, rows: list[_Row]) -> int:
        """Tokens every row starts with that are worth prefilling once per adapter (0: none).

        k-shot evaluation prompts share their demonstrations, chat prompts their
        system text: those tokens are run once per distinct adapter in the batch
        and their cache copied to the rows. Each row keeps at least one token of
        its own (the logits of the next token come from it). Off for models with
        sliding-window layers: padding between prefix and suffix would shift
        their window.
        """
        if not self.share_prefixes or len(rows) <= len({r.adapter for r in rows}):
            return 0
        first = rows[0].ids
        length = min(len(r.ids) for r in rows) - 1
        for row in rows[1:]:
            n = 0
            while n < length and row.ids[n] == first[n]:
                n += 1
            length = n
        return length if length >= self.min_shared_prefix else 0

    def _prefill(self, batch: "_Batch", cache: Any, path: Path_) -> "torch.Tensor":
        """The prompt forward pass: the shared prefix once per adapter, copied to every row, then each row's rest."""
        import torch

        shared_ids = batch.shared_ids
        if shared_ids:
            distinct = list(dict.fromkeys(batch.adapters))
            ids = torch.tensor([shared_ids] * len(distinct), device=batch.input_ids.device)
            ones = torch.ones_like(ids)
            positions = torch.arange(len(shared_ids), device=ids.device).expand_as(ids)
            self._set_rows(distinct, path)
            self._forward(ids, ones, positions, distinct, cache, path)
            cache.batch_select_indices(torch.tensor([distinct.index(a) for a in batch.adapters], device=ids.device))
            self._set_rows(batch.adapters, path)
            self.shared_prefix_tokens += len(shared_ids) * (len(batch.adapters) - len(distinct))
        return self._forward(batch.input_ids, batch.attention, batch.positions, batch.adapters, cache, path)

    def _set_rows(self, adapters: list[str], path: Path_) -> None:
        if self._multi is not None and path != "peft":
            self._multi.set_rows(adapters)

    def _steps(self, requests: Sequence[GenerationRequest], batch: "_Batch", cache: Any, path: Path_) -> Iterator[StreamEvent]:
        """Prefill, then per step: combine each request's branches, pick, stream, drop finished rows."""
        import torch

        generators = [_generator(r.sampling.seed) for r in requests]
        trackers = [_TextTracker(self.tokenizer, r.sampling.stop) for r in requests]
        steps = [0] * len(requests)
        active = list(range(len(requests)))  # requests still decoding
        logits = self._prefill(batch, cache, path)
        while True:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            next_token: dict[int, int] = {}
            finished: list[int] = []
            for req in active:
                request = requests[req]
                scores = combine(logprobs[batch.rows_of[req]], request.rule, [b.weight for b in request.branches], request.sampling.alpha)
                token = pick_token(scores, request.sampling, generators[req], trackers[req].ids)
                steps[req] += 1
                reason: FinishReason | None = None
                if token in self.eos_ids and not request.sampling.ignore_eos:
                    reason = "eos"
                elif trackers[req].add(token):
                    reason = "stop"
                elif steps[req] >= request.sampling.max_new_tokens:
                    reason = "length"
                delta = trackers[req].delta(final=reason is not None)
                yield StreamEvent(req, delta, token, reason, scores.clone() if request.record_scores else None)
                if reason:
                    finished.append(req)
                else:
                    next_token[req] = token
            active = [r for r in active if r not in finished]
            if not active:
                return
            if finished:  # drop the finished requests' rows from the batch and the cache
                index = batch.keep(active)
                cache.batch_select_indices(index)
                self._set_rows(batch.adapters, path)
            step_ids = torch.tensor([[next_token[req]] for req in batch.row_request], device=batch.input_ids.device)
            batch.advance()
            logits = self._forward(step_ids, batch.attention, batch.positions, batch.adapters, cache, path)

    def _forward(
        self, input_ids: "torch.Tensor", attention: "torch.Tensor", positions: "torch.Tensor", adapters: list[str], cache: Any, path: Path_
    ) -> "torch.Tensor":
        if path == "runner":
            assert self.runner is not None
            return self.runner.forward(input_ids, attention, positions, cache, self._multi)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if path == "peft":
            if hasattr(self.model, "peft_config"):
                kwargs["adapter_names"] = adapters
            elif any(name != PEFT_BASE for name in adapters):
                raise EngineError("no adapter is loaded")
        return self.model(**kwargs).logits[:, -1, :]


@dataclass
class _Batch:
    """The rows being decoded: attention mask, positions, each row's adapter and request."""

    input_ids: "torch.Tensor"
    attention: "torch.Tensor"
    positions: "torch.Tensor"
    adapters: list[str]
    row_request: list[int]
    rows_of: dict[int, list[int]]
    shared_ids: list[int]  # the prompt prefix every row starts with, prefilled once per adapter ([] when none)

    @classmethod
    def left_padded(cls, rows: list[_Row], pad: int, device: Any, shared: int = 0) -> "_Batch":
        """Rows after their first ``shared`` tokens, left-padded; the mask also covers the shared (cached) part."""
        import torch

        rests = [r.ids[shared:] for r in rows]
        width = max(len(rest) for rest in rests)
        input_ids = torch.tensor([[pad] * (width - len(rest)) + rest for rest in rests], device=device)
        attention = torch.tensor([[1] * shared + [0] * (width - len(rest)) + [1] * len(rest) for rest in rests], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        row_request = [r.request for r in rows]
        return cls(input_ids, attention, positions, [r.adapter for r in rows], row_request, _rows_by_request(row_request), rows[0].ids[:shared])

    def keep(self, requests: list[int]) -> "torch.Tensor":
        """Keep only the rows of ``requests``; returns the kept row indices."""
        import torch

        keep = [pos for req in requests for pos in self.rows_of[req]]
        index = torch.tensor(keep, device=self.attention.device)
        self.attention = self.attention[index]
        self.positions = self.positions[index]
        self.adapters = [self.adapters[p] for p in keep]
        self.row_request = [self.row_request[p] for p in keep]
        self.rows_of = _rows_by_request(self.row_request)
        return index

    def advance(self) -> None:
        """Every row appended one token."""
        self.attention = torch_cat_ones(self.attention)
        self.positions = self.positions[:, -1:] + 1


def torch_cat_ones(attention: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)


def _rows_by_request(row_request: list[int]) -> dict[int, list[int]]:
    """Request index -> positions of its rows in the batch."""
    rows: dict[int, list[int]] = {}
    for position, request in enumerate(row_request):
        rows.setdefault(request, []).append(position)
    return rows


def _generator(seed: int | None) -> "torch.Generator":
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return generator


def base_model(model: Any) -> Any:
    """The causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _has_sliding_window(model: Any) -> bool:
    config = base_model(model).config
    config = getattr(config, "text_config", None) or config
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in (getattr(config, "layer_types", None) or ())


def _model_device(model: Any) -> "torch.device":
    return next(model.parameters()).device


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=base_model(model).config)
