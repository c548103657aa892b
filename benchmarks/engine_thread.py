"""Decode speed by thread layout: the engine loaded and run on one thread, against loaded on one and run on another.

Run: .venv/bin/python benchmarks/engine_thread.py [--model gemma3-270m] [--rounds 2]

An engine replica serves from threads. Before session 21 it loaded the model
on its constructor's thread and decoded on the scheduler's, so libgomp kept two
thread pools; with more pool threads than cores it parks its workers between
parallel regions (carve.engine.engine_thread). Each layout runs in a fresh
process (a pool lives as long as its thread), alternated ``--rounds`` times:

- one thread: the replica's layout now (an EngineThread loads and decodes);
- two threads: the model loaded on the main thread, decoded on a second one.

Both decode the engine benchmark's bare questions greedily (EOS ignored, no
adapter) at B = 1 and B = 16; best tokens/s per layout, then
``RESULT one_thread_vs_two_b1=.. one_thread_vs_two_b16=..``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import timed_stream  # noqa: E402

LAYOUTS = ("one thread", "two threads")
BATCHES = (1, 16)


def decode_rates(engine: object, tokens: int) -> dict[int, float]:
    """Greedy decode tokens/s at each of BATCHES (after a warm-up), from the first streamed token to the last."""
    from engine import QUESTIONS

    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.text import format_user_prompt

    prompts = [format_user_prompt(engine.tokenizer, q) for q in QUESTIONS]  # type: ignore[attr-defined]
    rates = {}
    for batch in BATCHES:
        requests = [GenerationRequest.single(prompts[i % len(prompts)], None, Sampling(max_new_tokens=tokens, ignore_eos=True)) for i in range(batch)]
        engine.generate(requests)  # type: ignore[attr-defined]
        _, seconds, steps = timed_stream(engine, requests)
        rates[batch] = batch * steps / seconds
    return rates


def child(model: str, layout: str, threads: int, tokens: int) -> None:
    """One layout in this process; prints its rates as JSON."""
    from carve.engine.engine_thread import EngineThread
    from carve.engine.loading import open_engine

    if layout == "one thread":
        worker = EngineThread("bench-engine", torch_threads=threads)
        engine = worker.run(lambda: open_engine(model)[0])
        rates = worker.run(decode_rates, engine, tokens)
    else:
        import torch

        torch.set_num_threads(threads)
        engine = open_engine(model)[0]
        box: dict[str, dict[int, float]] = {}
        thread = threading.Thread(target=lambda: box.update(rates=decode_rates(engine, tokens)))
        thread.start()
        thread.join()
        rates = box["rates"]
    print(json.dumps(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.threads, args.tokens)
        return

    best = {layout: {b: 0.0 for b in BATCHES} for layout in LAYOUTS}
    for round_ in range(args.rounds):
        for layout in LAYOUTS:
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--tokens", str(args.tokens), "--child", layout],
                capture_output=True, text=True, check=True,
            )
            rates = {int(b): r for b, r in json.loads(out.stdout.strip().splitlines()[-1]).items()}
            print(f"round {round_ + 1}, {layout:<11}: " + ", ".join(f"B={b} {rates[b]:6.1f} tokens/s" for b in BATCHES), flush=True)
            for b in BATCHES:
                best[layout][b] = max(best[layout][b], rates[b])
    print(f"{args.model}, {args.threads} torch threads, best of {args.rounds} fresh processes per layout:")
    for layout in LAYOUTS:
        print(f"  {layout:<11}: " + ", ".join(f"B={b} {best[layout][b]:6.1f} tokens/s" for b in BATCHES))
    ratio = {b: best["one thread"][b] / best["two threads"][b] for b in BATCHES}
    print(f"RESULT one_thread_vs_two_b1={ratio[1]:.3f} one_thread_vs_two_b16={ratio[16]:.3f}")


if __name__ == "__main__":
    main()
