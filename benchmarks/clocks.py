"""Wall-clock time by part of the engine runner's forward pass, for the profile benchmarks.

torch's profiler inflated some operators 2-10x on this CPU (a fused gate/up
product at 78 GFLOP/s in its table, 175 by the clock), so the profiles time
each part with a clock around the call instead: the four fused products (by
kind), the output projection, the norms, attention (the masked kernel and the
row-by-row path, counted once when one runs inside the other) and the LoRA
deltas. The rest of a pass is what remains of the passes' own time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

PRODUCTS = ("qkv", "o", "gate_up", "down")
PASSES = "forward passes"
REST = "the rest of the passes (element-wise work, RoPE, layout)"
OUTSIDE = "outside the passes (tokenizing, scheduling, picking tokens)"


def clocked(spent: Counter[str], name: str, call: Callable[..., Any], running: set[str]) -> Callable[..., Any]:
    """``call`` with its wall time added to ``spent[name]``; a call nested in one of the same name is not counted twice."""
    import time

    def timed(*args: Any, **kwargs: Any) -> Any:
        if name in running:
            return call(*args, **kwargs)
        running.add(name)
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
            running.discard(name)

    return timed


def clock_runner(engine: Any) -> Counter[str]:
    """Put clocks around the parts of ``engine``'s runner (for the rest of the process); returns the counter they fill."""
    import torch.nn.functional as F

    import carve.engine.multi_lora as multi_lora
    import carve.engine.runner as runner_module

    spent: Counter[str] = Counter()
    running: set[str] = set()
    runner = engine.runner
    for layer in runner.layers:
        for name in PRODUCTS:
            setattr(layer, name, clocked(spent, name, getattr(layer, name), running))
    runner.lm_head = clocked(spent, "output projection", runner.lm_head, running)
    runner._norm = clocked(spent, "norms", runner._norm, running)
    runner.forward_parts = clocked(spent, PASSES, runner.forward_parts, running)
    runner_module._rows_attention = clocked(spent, "attention", runner_module._rows_attention, running)
    F.scaled_dot_product_attention = clocked(spent, "attention", F.scaled_dot_product_attention, running)
    multi_lora.MultiLora.add_delta = clocked(spent, "LoRA deltas", multi_lora.MultiLora.add_delta, running)  # type: ignore[method-assign]
    return spent


def shares(spent: Counter[str], took: float) -> dict[str, float]:
    """Seconds by part, the rest of the passes and the time outside them added (of ``took`` seconds in all)."""
    parts = Counter(spent)
    passes = parts.pop(PASSES, 0.0)
    out = dict(parts.most_common())
    out[REST] = passes - sum(parts.values())
    out[OUTSIDE] = took - passes
    return out
