"""Engine throughput on the real SmolLM2 against Hugging Face generate and the naive multi-LoRA loop.

16 prompts x 64 new tokens, greedy, exactly 64 tokens each (EOS ignored on every side):
  (a) engine, one adapter for all rows      (c) HF generate batched, same peft model, same adapter active
  (b) engine, 4 adapters mixed in one batch (d) naive: set_adapter + generate per request
  (e) engine on the base alone
Targets: a >= 0.9 c, b >= 0.8 a, b >= 3 d.

Run: ../shared/tools/offline .venv/bin/python benchmarks/engine.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import OUT_DIR, bar_chart, make_random_adapters, timer  # noqa: E402

QUESTIONS = [
    "What does the BRCA1 gene do?", "Name three symptoms of measles.", "Explain what an enzyme inhibitor is.",
    "What is the role of insulin?", "Describe how vaccines train the immune system.", "What causes anemia?",
    "Summarise the function of the liver.", "What is a randomized controlled trial?", "Define hypertension.",
    "How do statins lower cholesterol?", "What is the difference between a virus and a bacterium?",
    "Explain the term metastasis.", "What is an antibody?", "Why is folic acid important in pregnancy?",
    "What does an MRI scan show?", "How does aspirin reduce pain?",
]
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2, help="best of N timed rounds per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.loading import open_engine
    from carve.engine.models import resolve_model
    from carve.engine.text import format_user_prompt

    torch.manual_seed(0)
    resolved = resolve_model(args.model)
    names = [f"a{i}" for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_random_adapters(resolved.path, names, Path(tmp))
        engine, _, plan = open_engine(args.model, list(adapters.items()))
    tokenizer, model = engine.tokenizer, engine.model
    prompts = [format_user_prompt(tokenizer, q) for q in QUESTIONS]
    sampling = Sampling(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    total_tokens = len(prompts) * NEW_TOKENS
    print(f"model {resolved.name} ({plan.describe()}), {len(prompts)} prompts x {NEW_TOKENS} new tokens, greedy, best of {args.rounds}")

    def engine_run(assign: list[str | None]) -> None:
        results = engine.generate([GenerationRequest.single(p, a, sampling) for p, a in zip(prompts, assign)])
        assert all(len(r.token_ids) == NEW_TOKENS for r in results)

    def hf_batched() -> None:
        model.set_adapter("a0")
        tokenizer.padding_side = "left"
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - inputs["input_ids"].shape[1] == NEW_TOKENS

    def naive_loop() -> None:
        for i, prompt in enumerate(prompts):
            model.set_adapter(names[i % 4])
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    configs = {
        "a engine, 1 adapter": lambda: engine_run(["a0"] * len(prompts)),
        "b engine, 4 adapters mixed": lambda: engine_run([names[i % 4] for i in range(len(prompts))]),
        "c HF generate, 1 adapter": hf_batched,
        "d naive set_adapter+generate": naive_loop,
        "e engine, base only": lambda: engine_run([None] * len(prompts)),
    }
    engine_run(["a0", "a1", None, "a2"] * 4)  # warm-up: allocator, kernels
    best: dict[str, float] = {}
    for round_ in range(args.rounds):
        for label, run in configs.items():
            if label.startswith("d") and round_ > 0:
                continue  # the naive loop is slow and steady: one round is enough
            with timer() as elapsed:
                run()
            rate = total_tokens / elapsed[0]
            best[label] = max(best.get(label, 0.0), rate)
            print(f"  round {round_ + 1}: {label:32s} {rate:7.1f} tokens/s", flush=True)

    a, b, c, d, e = (best[k] for k in configs)
    print()
    print(f"{'configuration':34s} {'tokens/s':>9s}")
    for label, rate in best.items():
        print(f"{label:34s} {rate:9.1f}")
    print(f"adapter cost: engine 1 adapter / base only = {a / e:.2f}")
    print(f"targets: a/c >= 0.9 -> {a / c:.2f}; b/a >= 0.8 -> {b / a:.2f}; b/d >= 3 -> {b / d:.2f}")
    chart = bar_chart(OUT_DIR / "engine.png", f"Decoding throughput, {resolved.name}, 16x64 tokens", list(best), list(best.values()), "tokens/s")
    print(f"chart: {chart}")
    print(f"RESULT engine_vs_hf={a / c:.3f} mixed_vs_single={b / a:.3f} mixed_vs_naive={b / d:.3f}")


if __name__ == "__main__":
    main()
