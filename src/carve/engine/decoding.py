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
depend on what else shares its batch. Requests may also join and leave a
running batch between steps (:meth:`Engine.session`, continuous batching).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from carve.engine.adapter_checks import check_adapter_files, check_adapter_fits
from carve.engine.constraints import prepare
from carve.engine.drafting import DraftSettings
from carve.engine.host_memory import keep_freed_memory
from carve.engine.multi_lora import PEFT_BASE, MultiLora
from carve.engine.picking import adjust_scores, combine, nucleus_candidates, pick_token
from carve.engine.prefix_cache import PrefixCache
from carve.engine.requests import Branch, Completion, EngineError, FinishReason, GenerationRequest, Rule, Sampling, StreamEvent
from carve.engine.runner import Part, Runner, WeightFormat, unsupported_reason
from carve.engine.session import DecodeSession, ForwardPath, PartInput
from carve.engine.text import encode_prompt

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [  # the engine's vocabulary, importable from here as before the split into requests / picking / session
    "Branch", "Completion", "DecodeSession", "Engine", "EngineError", "FinishReason", "ForwardPath", "GenerationRequest", "Rule", "Sampling",
    "StreamEvent", "adjust_scores", "base_model", "combine", "nucleus_candidates", "pick_token",
]

_WHOLE_PROMPTS = sys.maxsize  # a step's prefill budget when admitted prompts run whole in the next pass (offline decoding)


@dataclass
class _Building:
    """One request's Completion as its events arrive."""

    index: int  # the request's position in what the caller gave
    prompt_tokens: int
    scores: list[Any] | None
    text: str = ""
    ids: list[int] = field(default_factory=list)
    reason: FinishReason | None = None

    def add(self, event: StreamEvent) -> None:
        self.text += event.delta
        if event.token_id is not None:
            self.ids.append(event.token_id)
        if event.finish_reason:
            self.reason = event.finish_reason
        if event.scores is not None and self.scores is not None:
            self.scores.append(event.scores)

    def completion(self) -> Completion:
        return Completion(self.text, self.ids, self.reason or "length", self.prompt_tokens, self.scores)


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
        self.share_prefixes = True  # k-shot prompts' common prefix prefilled once (off: every row runs its whole prompt)
        self.sliding_window = _has_sliding_window(model)  # prefix sharing is exact for such a model on the runner only
        self.min_shared_prefix = 16  # below this an extra forward pass costs more than it saves
        self.shared_prefix_tokens = 0  # prompt tokens not recomputed thanks to shared prefixes
        self.prefix_cache: PrefixCache | None = None  # prefixes kept across requests (the runner's caches only)
        self.drafts = DraftSettings()  # speculative decoding by prompt lookup for plain greedy rows (off: tokens 0)
        self.drafted_tokens = self.accepted_draft_tokens = 0  # draft tokens checked, and kept
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])  # the width of a step's logits
        self.runner = self._build_runner(weight_format) if runner else None
        if self.device().type == "cpu":
            keep_freed_memory()  # a long prefill's activations reused, not page-faulted again at every layer
        if self.runner is not None:
            self.prefix_cache = PrefixCache(min_tokens=self.min_shared_prefix)
        if weight_format != "native" and self.runner is None:
            raise EngineError(f"weight format {weight_format!r} needs the engine's runner, which is off")

    def _build_runner(self, weight_format: WeightFormat) -> Runner | None:
        """The engine's own forward when the model allows it; None keeps Hugging Face's."""
        reason = unsupported_reason(self.model)
        if reason is None:
            return Runner(self.model, weight_format)
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
            self._forget_prefixes(name)

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
            self._forget_prefixes(name)

    def _forget_prefixes(self, name: str) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.forget(name)

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
        """Decode every request to completion, all in one batch; one Completion per request, in order."""
        done = dict(self.complete(requests, max_rows=None))
        return [done[i] for i in range(len(requests))]

    def complete(self, requests: Iterable[GenerationRequest], max_rows: int | None) -> Iterator[tuple[int, Completion]]:
        """Each request's Completion with its position in ``requests``, as soon as it finishes.

        Offline continuous batching (as vLLM's ``LLM.generate``): at most ``max_rows`` rows (one
        per branch; None: every request at once) decode together and the next requests join as
        rows free, so one long answer no longer holds a batch of finished ones. ``requests`` is
        read lazily, only when there is room: a caller may stop producing requests, or stop
        iterating, once it has what it needs (the rows still running are dropped).
        """
        building: dict[int, _Building] = {}
        for event in self._decode(requests, max_rows, building):
            part = building[event.index]
            part.add(event)
            if event.finish_reason:
                del building[event.index]
                yield part.index, part.completion()

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Yield each request's new text after every decoding step (token streaming), all in one batch."""
        building: dict[int, _Building] = {}
        for event in self._decode(requests, None, building):
            yield dataclasses.replace(event, index=building[event.index].index)

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

    def prepare_structured_output(self) -> None:
        """Build the grammar masks' view of the tokenizer now rather than at the first constrained request
        (a second or more for a large vocabulary, which would stall every running row). EngineError when unavailable."""
        prepare(self.tokenizer, self.vocab_size, self.eos_ids)

    def session(self) -> DecodeSession:
        """A running batch on this engine that requests join and leave between steps (carve.engine.session)."""
        return DecodeSession(self, self.lock)

    def _decode(self, requests: Iterable[GenerationRequest], max_rows: int | None, building: "dict[int, _Building]") -> Iterator[StreamEvent]:
        """The requests' events in one session (indexed by session id; ``building`` maps each id to its request).

        Requests are admitted while their rows fit under ``max_rows`` (a request alone is
        admitted whatever its width), each admission's prompts run whole in the next step's
        forward pass, and steps go on until every admitted request finished and none is left.
        """
        source = enumerate(requests)
        waiting = next(source, None)  # the next request, read when the last one was admitted
        with self.lock:
            session = self.session()
            while True:
                group: list[tuple[int, GenerationRequest]] = []
                free = None if max_rows is None else max_rows - session.rows - session.prefilling_rows
                while waiting is not None and (free is None or len(waiting[1].branches) <= free or (not group and session.idle)):
                    group.append(waiting)
                    free = None if free is None else free - len(waiting[1].branches)
                    waiting = next(source, None)
                if group:
                    ids = session.admit([request for _, request in group])
                    for (index, request), request_id in zip(group, ids):
                        building[request_id] = _Building(index, session.prompt_tokens(request_id), [] if request.record_scores else None)
                if session.idle:
                    return
                yield from session.step(prefill_budget=_WHOLE_PROMPTS)

    def forward_path(self) -> ForwardPath:
        """The runner where it applies (every adapter served by MultiLora, or none loaded), else Hugging Face's forward."""
        has_adapters = hasattr(self.model, "peft_config")
        if self.runner is not None and (self._multi is not None or not has_adapters):
            return "runner"
        return "multi" if self._multi is not None else "peft"

    def new_cache(self, capacity: int, path: ForwardPath) -> Any:
        """An empty KV cache for ``path``: the runner's preallocated one (``capacity`` columns) or Hugging Face's."""
        if path == "runner":
            assert self.runner is not None
            return self.runner.new_cache(capacity)
        from transformers import DynamicCache

        return DynamicCache(config=base_model(self.model).config)

    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    def forward(
        self, input_ids: "torch.Tensor", attention: "torch.Tensor", positions: "torch.Tensor", adapters: list[str], cache: Any, path: ForwardPath
    ) -> "torch.Tensor":
        """Run ``input_ids`` [rows, q] after the cached columns, row i under adapter ``adapters[i]``; the last position's logits."""
        return self.forward_parts([PartInput(input_ids, attention, positions, adapters, cache)], path)[0]

    def forward_parts(self, parts: Sequence[PartInput], path: ForwardPath) -> list["torch.Tensor"]:
        """Several batches (input ids, mask, positions, row adapters, cache), each after its own cache; the last positions' logits of each.

        The runner runs them in one pass (the weights read once for all their
        tokens); Hugging Face's forward runs them one after the other.
        """
        for part in parts:
            if path != "peft" and self._multi is None and any(name != PEFT_BASE for name in part.adapters):
                raise EngineError(f"the {path} forward needs the concatenated-factor LoRA, which the loaded adapters do not allow")
        if path == "runner":
            assert self.runner is not None
            rows = Runner.token_rows([(p.input_ids, p.attention, p.adapters) for p in parts])
            with self._multi.batch(rows, hooks=False) if self._multi is not None else contextlib.nullcontext():
                return self.runner.forward_parts([Part(p.input_ids, p.attention, p.positions, p.cache, p.logit_columns) for p in parts], self._multi)
        return [self._hf_forward(part, path) for part in parts]

    def _hf_forward(self, part: PartInput, path: ForwardPath) -> "torch.Tensor":
        """Hugging Face's forward: LoRA rows through MultiLora's hooks ("multi") or peft's mixed batches ("peft")."""
        lora = self._multi.batch(part.adapters) if self._multi is not None and path == "multi" else contextlib.nullcontext()
        with lora:
            kwargs: dict[str, Any] = dict(
                input_ids=part.input_ids, attention_mask=part.attention, position_ids=part.positions, past_key_values=part.cache,
                use_cache=True, logits_to_keep=part.logit_columns,
            )
            if path == "peft":
                if hasattr(self.model, "peft_config"):
                    kwargs["adapter_names"] = part.adapters
                elif any(name != PEFT_BASE for name in part.adapters):
                    raise EngineError("no adapter is loaded")
            logits = self.model(**kwargs).logits
            return logits[:, -1, :] if part.logit_columns == 1 else logits


def base_model(model: Any) -> Any:
    """The causal LM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _has_sliding_window(model: Any) -> bool:
    config = base_model(model).config
    config = getattr(config, "text_config", None) or config
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in (getattr(config, "layer_types", None) or ())
