"""Decoding a routing decision: one engine request (output space) or one merged adapter (weight space).

Output space: one branch per adapter over the same prompt, combined by the
engine's ``mixture`` rule, p(y) = sum_j w_j p_j(y). It is exact for the mixture
of experts, needs no preparation, and costs one batch row per adapter.

Weight space: peft's ``add_weighted_adapter(..., combination_type="cat")``
builds one adapter whose update is exactly sum_j w_j * dW_j (the A matrices
stacked, the B matrices scaled by w_j and stacked; rank = sum of ranks). A
merged adapter decodes as one row, like a single adapter, but is a different
model: it mixes the experts' weights, not their predictions. Building one
takes time (see benchmarks/router.py), so merges are cached per
(adapters+versions, weights), least recently used evicted.

Which to use (benchmarks/router.py, SmolLM2-135M fp32 on a shared 2-core CPU,
two rank-8 adapters, 0.5/0.5): a 2-adapter output-space mixture costs 1.5x
(1 request) to 1.7x (4 requests) the time of one adapter; the merged adapter
costs 0.99x to 1.10x, after a one-off build of 1.4 s per (adapters, weights).
So weight space wins when the same mixture serves many tokens (a fixed
blend an operator names, repeated ``carve.mix`` weights, long outputs, big
batches): the build is repaid after roughly ten generated tokens. Output
space wins when weights change per request (auto top-k weights follow each
request's confidences, so nearly every request would need its own merge),
for one-off mixtures, and whenever the result must be the exact mixture of
the experts' predictions rather than a blend of their weights.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from carve.router.decision import RoutingDecision


Weighted = Sequence[tuple[Any, float]]  # (adapter with .name and .version, or None for the base; weight)


def _pairs(what: RoutingDecision | Weighted) -> list[tuple[Any, float]]:
    return what.weighted() if isinstance(what, RoutingDecision) else list(what)


def engine_request(what: RoutingDecision | Weighted, prompt: str, sampling: Any, engine_name: Callable[[Any], str]) -> Any:
    """The engine GenerationRequest of an output-space decision (or of its [(adapter, weight)] list).

    ``engine_name(adapter)`` gives the name under which the adapter is loaded in
    the engine. A single branch decodes with rule ``single``; several with
    ``mixture``, one branch per adapter, each with its weight.
    """
    from carve.platform.engine import Branch, GenerationRequest

    branches = tuple(Branch(prompt, engine_name(a) if a is not None else None, w) for a, w in _pairs(what))
    return GenerationRequest(branches, "mixture" if len(branches) > 1 else "single", sampling)


def merge_key(what: RoutingDecision | Weighted, digits: int = 6) -> tuple[tuple[str, float], ...]:
    """What identifies a merged adapter: each adapter version with its weight (rounded), in a fixed order."""
    return tuple(sorted((f"{a.name}@v{a.version}", round(w, digits)) for a, w in _pairs(what) if a is not None))


def merged_name(key: tuple[tuple[str, float], ...]) -> str:
    return "merged-" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]


class MergeCache:
    """Weight-space mixtures built in an engine and kept there, ``capacity`` at most (LRU).

    The component adapters must already be loaded in the engine
    (``engine_name(record)`` names them). Calls hold the engine's lock, so a
    merge never runs while the engine decodes.
    """

    def __init__(self, engine: Any, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.engine, self.capacity = engine, capacity
        self._entries: "OrderedDict[tuple, str]" = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0
        self.evictions = 0

    def __contains__(self, what: RoutingDecision | Weighted) -> bool:
        return merge_key(what) in self._entries

    def acquire(self, what: RoutingDecision | Weighted, engine_name: Callable[[Any], str]) -> str:
        """The engine name of the merged adapter for a decision (or [(adapter, weight)]), built now if not cached."""
        key = merge_key(what)
        pairs = [(a, w) for a, w in _pairs(what) if a is not None]
        if len(pairs) < 2:
            raise ValueError("a weight-space merge needs at least two adapters")
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            name = merged_name(key)
            adapters = [engine_name(a) for a, _ in pairs]
            weights = [w for _, w in pairs]
            with self.engine.lock:
                while len(self._entries) >= self.capacity:
                    _, old = self._entries.popitem(last=False)
                    self.engine.unload_adapter(old)
                    self.evictions += 1
                merge_into(self.engine.model, adapters, weights, name)
            self.builds += 1
            self._entries[key] = name
            return name


def merge_into(peft_model: Any, adapters: list[str], weights: list[float], name: str) -> None:
    """Add adapter ``name`` = sum_j weights[j] * adapters[j] in weight space (peft 'cat', exact)."""
    peft_model.add_weighted_adapter(adapters=adapters, weights=weights, adapter_name=name, combination_type="cat")


def lora_deltas(adapter_dir: Path) -> dict[str, Any]:
    """dW = scaling * B @ A of every LoRA module in a PEFT adapter folder, by module name (tests and checks)."""
    import json

    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return deltas_from_tensors(tensors, float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora", False)))


def deltas_from_tensors(tensors: dict[str, Any], alpha: float, r: int, rslora: bool = False, adapter: Optional[str] = None) -> dict[str, Any]:
    """dW per module from lora_A / lora_B tensors (saved names, or a live model's with ``adapter`` set)."""
    scaling = alpha / (r**0.5 if rslora else r)
    out: dict[str, Any] = {}
    suffix_a = f"lora_A.{adapter}.weight" if adapter else "lora_A.weight"
    for name, a in tensors.items():
        if not name.endswith(suffix_a):
            continue
        module = name[: -len(suffix_a)].rstrip(".")
        b = tensors[name[: -len(suffix_a)] + suffix_a.replace("lora_A", "lora_B")]
        out[module.removeprefix("base_model.model.")] = scaling * (b.float() @ a.float())
    return out
