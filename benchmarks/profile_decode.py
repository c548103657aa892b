"""Where a decode step's time goes: wall-clock time by part of the engine's decoding at batch B (issue 17).

Decodes B rows greedily (EOS ignored) on the real model with random adapters,
one adapter on every row or ``--adapters 4`` mixed, and prints the step time,
the model-shape ceiling's share of it (the products alone, no Python around
them), and each part of the step by the clock (benchmarks/clocks.py): the
fused products by kind, the output projection, attention, norms, LoRA, the
rest of the pass, and what happens outside the pass (the session's
bookkeeping, picking tokens). ``--torch-profiler`` adds torch's operator
table (read with its inflation in mind: clocks.py). Last line: ``RESULT``
with the step time, the ceiling's share and each part's ms per step.

Run: ../shared/tools/offline .venv/bin/python benchmarks/profile_decode.py --batch 32 [--adapters 4] [--torch-profiler]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from clocks import clock_runner, shares  # noqa: E402
from common import make_random_adapters, timed_stream  # noqa: E402
from engine import QUESTIONS, ceiling_seconds, model_shapes, products  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=1, help="distinct adapters over the rows (round robin)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--precision", default="auto", help="auto (the engine's default), fp32, bf16 or int8")
    parser.add_argument("--torch-profiler", action="store_true", help="torch's operator table too (before the clocks go in)")
    parser.add_argument("--shapes", action="store_true", help="the operator table by input shapes too (which products cost what)")
    args = parser.parse_args()

    import torch

    from carve.engine.decoding import Engine, GenerationRequest, Sampling
    from carve.engine.models import load_base, plan_load, resolve_model
    from carve.engine.text import format_user_prompt

    resolved = resolve_model(args.model)
    names = [f"a{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_random_adapters(resolved.path, names, Path(tmp))
        plan = plan_load(False, args.precision)
        model, tokenizer = load_base(resolved, plan)
        engine = Engine(model, tokenizer, weight_format=plan.engine_weights)
        for name, path in adapters.items():
            engine.load_adapter(name, path)
    prompts = [format_user_prompt(tokenizer, q) for q in QUESTIONS]
    requests = [
        GenerationRequest.single(prompts[i % len(prompts)], names[i % len(names)], Sampling(max_new_tokens=args.tokens, ignore_eos=True))
        for i in range(args.batch)
    ]

    timed_stream(engine, requests)  # warm-up
    _, plain_seconds, plain_steps = timed_stream(engine, requests)
    step_ms = 1000 * plain_seconds / plain_steps
    shapes = model_shapes(engine)
    ceiling_ms = 1000 * ceiling_seconds(products(shapes, plan.engine_weights), shapes, args.batch, 2)
    print(f"model {resolved.name}, B={args.batch}, {args.adapters} adapter(s), {plan.describe()}, {torch.get_num_threads()} torch threads")
    print(f"decode step {step_ms:.1f} ms ({args.batch * 1000 / step_ms:.0f} tokens/s); the model's own products alone {ceiling_ms:.1f} ms "
          f"({ceiling_ms / step_ms:.0%} of the step)")
    if args.torch_profiler:  # before the clocks go in, so the profiler sees the runner's own calls
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            timed_stream(engine, requests)
        print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows))

    spent = clock_runner(engine)
    _, took, steps = timed_stream(engine, requests, on_first=spent.clear)  # the prompts' prefill (before the first token) left out
    print(f"by the clock ({steps} steps, {1000 * took / steps:.1f} ms each with the clocks in), ms per step:")
    parts = {name: 1000 * seconds / steps for name, seconds in shares(spent, took).items()}
    for name, ms in parts.items():
        print(f"  {name:<60} {ms:6.2f} ms  {100 * ms * steps / (1000 * took):5.1f}%")
    keys = " ".join(f"{name.split(' (')[0].replace(' ', '_')}_ms={ms:.2f}" for name, ms in parts.items())
    print(f"RESULT step_ms={step_ms:.1f} ceiling_ms={ceiling_ms:.1f} ceiling_share={ceiling_ms / step_ms:.3f} {keys}")


if __name__ == "__main__":
    main()
