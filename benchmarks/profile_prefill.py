"""Where a prefill of long k-shot prompts spends its time: wall-clock time by part of the runner's forward pass.

Run: .venv/bin/python benchmarks/profile_prefill.py [--model gemma3-270m] [--prompts 16] [--adapter] [--torch-profiler]
(the prefix cache off: every run prefills the whole prompts).

Each of the runner's fused products (per kind, summed over layers), attention,
the norms and the LoRA deltas are timed with a clock around the call
(benchmarks/clocks.py), the rest of the pass is what remains. ``--torch-profiler``
adds torch's profiler table by operator and shape, read with its inflation in
mind (clocks.py). A profile, not a target: no RESULT line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from clocks import PRODUCTS, clock_runner, shares  # noqa: E402
from common import make_random_adapters  # noqa: E402
from engine import QUESTIONS, kshot_prompts  # noqa: E402


def weights(product: Any) -> int:
    """The weights one of the runner's products multiplies by (any format)."""
    return int((product.weight if product.weight is not None else product.int8_t).numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--bare", action="store_true", help="the engine benchmark's bare questions in the chat template, not five-shot prompts")
    parser.add_argument("--adapter", action="store_true", help="every row through one random rank-8 adapter on all linears (as benchmarks/engine.py)")
    parser.add_argument("--torch-profiler", action="store_true")
    args = parser.parse_args()

    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.loading import open_engine
    from carve.engine.models import resolve_model
    from carve.engine.text import format_user_prompt

    engine = open_engine(args.model)[0]
    engine.prefix_cache = None
    adapter = None
    if args.adapter:
        adapter = "a0"
        with tempfile.TemporaryDirectory() as tmp:
            engine.load_adapter(adapter, make_random_adapters(resolve_model(args.model).path, [adapter], Path(tmp))[adapter])
    texts = [format_user_prompt(engine.tokenizer, q) for q in QUESTIONS] if args.bare else kshot_prompts(5)
    requests = [GenerationRequest.single(text, adapter, Sampling(max_new_tokens=1)) for text in texts[: args.prompts]]
    tokens = sum(len(engine.encode(r.branches[0].prompt)) for r in requests)
    engine.generate(requests)  # warm-up (bare prompts are short: the first run would time the allocator)
    if args.torch_profiler:  # before the clocks go in, so the profiler sees the runner's own calls
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            engine.generate(requests)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=45, max_shapes_column_width=70))

    runner = engine.runner
    flops = Counter({name: 2 * tokens * sum(weights(getattr(layer, name)) for layer in runner.layers) for name in PRODUCTS})
    spent = clock_runner(engine)
    start = time.perf_counter()
    engine.generate(requests)
    took = time.perf_counter() - start
    print(f"{args.model}: {len(requests)} {'bare' if args.bare else 'five-shot'} prompts{' through an adapter' if adapter else ''}, "
          f"{tokens} prompt tokens in {took:.2f} s = {tokens / took:.0f} tokens/s")
    for name, seconds in shares(spent, took).items():
        rate = f"  {flops[name] / seconds / 1e9:4.0f} GFLOP/s" if name in flops else ""
        print(f"  {name:<60} {seconds:7.2f} s  {100 * seconds / took:5.1f}%{rate}")


if __name__ == "__main__":
    main()
