"""Where a prefill of long k-shot prompts spends its time: torch's profiler over one Engine.generate of 4 five-shot prompts.

Run: .venv/bin/python benchmarks/profile_prefill.py [--model gemma3-270m]   (the prefix cache off)
Prints the prefill rate and the top operators by self CPU time, with their shapes. A profile, not a target: no RESULT line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine import kshot_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.loading import open_engine

    engine = open_engine(args.model)[0]
    engine.prefix_cache = None  # every run prefills the whole prompts
    requests = [GenerationRequest.single(text, None, Sampling(max_new_tokens=1)) for text in kshot_prompts(5)[: args.prompts]]
    engine.generate(requests[:1])  # warm-up
    tokens = sum(len(engine.encode(r.branches[0].prompt)) for r in requests)
    start = time.perf_counter()
    engine.generate(requests)
    took = time.perf_counter() - start
    print(f"{args.model}: {len(requests)} five-shot prompts, {tokens} prompt tokens in {took:.2f} s = {tokens / took:.0f} tokens/s")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.generate(requests)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=45, max_shapes_column_width=70))


if __name__ == "__main__":
    main()
