"""Engine throughput on a real model (SmolLM2; --model gemma3-270m) against the machine's limits and Hugging Face generate.

Measured in one run, greedy, EOS ignored on every side, the engine's prefix cache emptied before every
timed run (the same prompts again would be copied, not run); every figure a ratio divides is measured in
alternation with its peer (best of --repeats rounds each), so the machine's drift hits both sides:
  limits   the hardware (a large fp32 matrix product's GFLOP/s, a large copy's GB/s) and
           the model-shape ceiling: the model's own matrix products for one step (every
           linear layer's shape plus the output projection, torch, no Python around them)
           at batch B, in each weight format of --formats (fp32 = native, bf16, int8), as
           tokens/s; the same for prefill
  decode   engine decode tokens/s at B = 1, 8, 16, 32, 64 (from each batch's first streamed
           token to its last: prefill excluded), in each format, one adapter for all rows
  peers    HF generate (same peft model, same adapter) at B = 1 and 16, decode steps only
           (timed by a logits processor called after every step's forward pass), on the fp32
           model users load by default and (--hf-bf16) on a whole-bf16 model
  mixing   at B = 16: 4 adapters mixed vs 1 adapter (run in alternation); the naive set_adapter+generate loop
  drafts   at B = 1, answers to 6 questions one by one to their natural end (EOS not ignored:
           the same tokens on every side), decode tokens/s of the engine without and with
           speculative decoding by prompt lookup (--draft-tokens) and of HF generate, in alternation;
           and the same answers sampled (seeded: the same text with drafts or without)
  prefill  engine prefill tokens/s vs the prefill ceiling (the output projection for each
           prompt's last token only, as a prefill needs), on 16 bare questions and on 16
           5-shot prompts as evaluation builds them (the shipped biomedical seeds as
           demonstrations, different ones in each prompt so no prefix is shared)

Targets (issue 17): decode >= 70% of ceiling at B = 16, 32 and >= 50% at B = 1; prefill
>= 70%; >= 2x HF generate at B = 16 and >= 3x at B = 1; 4 adapters mixed >= 0.9x one.

The ratios (RESULT) are those of --engine-format, by default the engine's own default format
(carve.engine.models.plan_load), each against the ceiling of the same weights.

Run: ../shared/tools/offline .venv/bin/python benchmarks/engine.py [--quick] [--formats native,bf16,int8] [--hf-bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).parent))

from common import OUT_DIR, make_random_adapters, timed_stream  # noqa: E402

QUESTIONS = [
    "What does the BRCA1 gene do?", "Name three symptoms of measles.", "Explain what an enzyme inhibitor is.",
    "What is the role of insulin?", "Describe how vaccines train the immune system.", "What causes anemia?",
    "Summarise the function of the liver.", "What is a randomized controlled trial?", "Define hypertension.",
    "How do statins lower cholesterol?", "What is the difference between a virus and a bacterium?",
    "Explain the term metastasis.", "What is an antibody?", "Why is folic acid important in pregnancy?",
    "What does an MRI scan show?", "How does aspirin reduce pain?",
]
BATCHES = (1, 8, 16, 32, 64)
DRAFT_QUESTIONS = 6  # answered one by one in the speculative-decoding measurement


def best_time(run: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` runs after one warm-up (the least disturbed by other load)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def hardware_limits(repeats: int) -> tuple[float, float]:
    """(fp32 GFLOP/s of a 2048^3 product, GB/s of a 256 MB copy: bytes read + written)."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gflops = 2 * n**3 / best_time(lambda: a @ b, repeats) / 1e9
    src = torch.empty(64 * 2**20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), repeats) / 1e9
    return gflops, bandwidth


def model_shapes(engine: Any) -> list[tuple[int, int]]:
    """(out, in) of every linear product of one token: the base's linear layers, then the output projection (last)."""
    config = engine.model.config
    output = (config.vocab_size, config.hidden_size)
    return [shape for shape in engine.base_linear_shapes().values() if shape != output] + [output]


def products(shapes: list[tuple[int, int]], weight_format: str) -> list[Callable[[Any], Any]]:
    """One callable x -> x @ W^T per shape, on random weights in the given format (the engine's own product code)."""
    import torch

    from carve.engine.runner import _Product

    return [_Product(torch.randn(out, inp) * 0.02, weight_format) for out, inp in shapes]  # type: ignore[arg-type]


def ceiling_seconds(prods: list[Callable[[Any], Any]], shapes: list[tuple[int, int]], rows: int, repeats: int) -> float:
    """Seconds for every product of one step over ``rows`` token rows, and nothing else."""
    import torch

    inputs = {inp: torch.randn(rows, inp) for _, inp in shapes}

    def step() -> None:
        for product, (_, inp) in zip(prods, shapes):
            product(inputs[inp])

    return best_time(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode measurement")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs per measurement")
    parser.add_argument("--quick", action="store_true", help="B = 1, 16, 32 only, no naive loop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument("--formats", default="native,bf16", help="the engine's weight formats to measure (native = the model's fp32, bf16, int8)")
    parser.add_argument("--engine-format", default=None, help="the format the RESULT ratios are of (default: the engine's default)")
    parser.add_argument("--hf-bf16", action="store_true", help="also time HF generate on a whole-bf16 model")
    parser.add_argument("--draft-tokens", type=int, default=4, help="also time B=1 answers with speculative decoding by prompt lookup (0: not)")
    parser.add_argument("--draft-new-tokens", type=int, default=96, help="most new tokens of each answer in the B=1 drafting measurement")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from carve.engine.decoding import Engine, GenerationRequest, Sampling
    from carve.engine.drafting import DraftSettings
    from carve.engine.models import LoadPlan, load_base, plan_load, resolve_model
    from carve.engine.text import format_user_prompt

    torch.manual_seed(0)
    batches = (1, 16, 32) if args.quick else BATCHES
    resolved = resolve_model(args.model)
    names = [f"a{i}" for i in range(4)]
    fmt = args.engine_format or plan_load(torch.cuda.is_available()).engine_weights
    formats = list(dict.fromkeys(["native", *args.formats.split(","), fmt]))  # fp32 always: the HF peers run on its model
    engines: dict[str, Engine] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_random_adapters(resolved.path, names, Path(tmp))
        for weights in formats:
            model, tokenizer = load_base(resolved, plan_load(False, "fp32"))
            engines[weights] = _with_adapters(Engine(model, tokenizer, weight_format=weights), adapters)  # type: ignore[arg-type]
        hf_models = {"fp32": engines["native"].model}
        if args.hf_bf16:
            model, tokenizer = load_base(resolved, LoadPlan("cpu", "bf16", False, "bf16"))
            hf_models["bf16"] = _with_adapters(Engine(model, tokenizer, runner=False), adapters).model
    fp32 = engines["native"]
    tokenizer = fp32.tokenizer
    prompts = [format_user_prompt(tokenizer, q) for q in QUESTIONS]
    kshot = kshot_prompts(5)
    load = _load_average()
    print(f"model {resolved.name}, cpu, {torch.get_num_threads()} torch threads, load average at start {load}")

    # -- the machine and the model-shape ceiling ------------------------------------------
    gflops, bandwidth = hardware_limits(args.repeats)
    shapes = model_shapes(fp32)
    weights = sum(o * i for o, i in shapes)
    print(f"hardware: fp32 matrix product {gflops:.0f} GFLOP/s, copy {bandwidth:.1f} GB/s")
    print(f"model: {len(shapes)} products, {weights / 1e6:.1f}M weights per token: {weights * 4 / 1e6:.0f} MB in fp32, "
          f"{weights * 2 / 1e6:.0f} MB in bf16, {weights / 1e6:.0f} MB in int8")
    print(f"  implied bounds: B=1 (bytes/bandwidth) fp32 {bandwidth * 1e9 / (weights * 4):.0f} tokens/s, bf16 {bandwidth * 1e9 / (weights * 2):.0f}, "
          f"int8 {bandwidth * 1e9 / weights:.0f}; large B (FLOPs/peak) {gflops * 1e9 / (2 * weights):.0f} tokens/s in fp32")
    prods = {f: products(shapes, f) for f in engines}
    prefill_rows = {"bare": sum(len(fp32.encode(p)) for p in prompts), "5-shot": sum(len(fp32.encode(p)) for p in kshot)}

    # -- engine decode: the time between each row's first and last token (prefill excluded) ----
    def engine_rates(engine: Engine, b: int, rows: list[str | None], repeats: int, texts: list[str] = prompts) -> tuple[float, float]:
        """(decode tokens/s, prefill tokens/s) of one batch of ``texts``, best of ``repeats`` after a warm-up."""
        requests = [GenerationRequest.single(texts[i % len(texts)], rows[i], Sampling(max_new_tokens=args.tokens, ignore_eos=True)) for i in range(b)]
        prompt_tokens = sum(len(engine.encode(r.branches[0].prompt)) for r in requests)
        best_decode = best_prefill = 0.0
        for _ in range(repeats + 1):  # the first is a warm-up
            if engine.prefix_cache is not None:
                engine.prefix_cache.forget()  # the same prompts again would be copied, not run
            prefill_s, decode_s, _ = timed_stream(engine, requests)
            best_decode = max(best_decode, b * (args.tokens - 1) / decode_s)
            best_prefill = max(best_prefill, prompt_tokens / prefill_s)
        return best_decode, best_prefill

    def alternate(*measures: Callable[[], float]) -> list[float]:
        """The best of each measure, the measures run in turn ``--repeats`` times.

        Every figure a ratio divides is measured in alternation with its peer: measured one
        after the other, a ratio drifts with the machine's other load (seen on this machine:
        4 adapters mixed at 0.73x one adapter in one run, 0.84x in the next)."""
        best = [0.0] * len(measures)
        for _ in range(args.repeats):
            for i, measure in enumerate(measures):
                best[i] = max(best[i], measure())
        return best

    decode, ceiling = {}, {}
    for f in engines:
        for b in batches:
            decode[f, b], ceiling[f, b] = alternate(
                lambda f=f, b=b: engine_rates(engines[f], b, ["a0"] * b, 1)[0], lambda f=f, b=b: b / ceiling_seconds(prods[f], shapes, b, 1)
            )
    # a prefill needs the output projection (the last shape) for each prompt's last token only
    prefill, prefill_ceiling = {}, {}
    for f in engines:
        for kind, texts in (("bare", prompts), ("5-shot", kshot)):
            prefill[f, kind], prefill_ceiling[f, kind] = alternate(
                lambda f=f, texts=texts: engine_rates(engines[f], len(texts), ["a0"] * len(texts), 1, texts)[1],
                lambda f=f, kind=kind, n=len(texts): prefill_rows[kind] / (
                    ceiling_seconds(prods[f][:-1], shapes[:-1], prefill_rows[kind], 1) + ceiling_seconds(prods[f][-1:], shapes[-1:], n, 1)
                ),
            )
    # 4 adapters mixed against one adapter, both at B = 16: (single, mixed) per format
    mixing = {
        f: alternate(
            lambda f=f: engine_rates(engines[f], 16, ["a0"] * 16, 1)[0],
            lambda f=f: engine_rates(engines[f], 16, [names[i % 4] for i in range(16)], 1)[0],
        )
        for f in engines
    }
    mixed = {f: mixing[f][1] for f in engines}

    # -- Hugging Face generate on the same peft model: steps timed by a logits processor -------
    class StepClock:
        """Called once per generated token, after that step's forward pass: the decode steps' times."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.times.append(time.perf_counter())
            return scores

    def hf_rate(peft_model: Any, b: int, repeats: int) -> float:
        from transformers import LogitsProcessorList

        peft_model.set_adapter("a0")
        tokenizer.padding_side = "left"
        inputs = tokenizer((prompts * 4)[:b], return_tensors="pt", padding=True, add_special_tokens=False)
        best = 0.0
        for _ in range(repeats + 1):  # the first is a warm-up
            clock = StepClock()
            with torch.inference_mode():
                peft_model.generate(
                    **inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([clock]),
                )
            best = max(best, b * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        return best

    hf: dict[tuple[str, int], float] = {}  # HF generate per model dtype and batch
    beside_hf: dict[tuple[str, int], float] = {}  # the engine measured in alternation with it
    for dtype, hf_model in hf_models.items():
        for b in (1, 16):
            beside_hf[dtype, b], hf[dtype, b] = alternate(
                lambda b=b: engine_rates(engines[fmt], b, ["a0"] * b, 1)[0], lambda b=b, m=hf_model: hf_rate(m, b, 1)
            )

    # -- speculative decoding at B=1: answers to their natural end, one request at a time ------
    kept_drafts: dict[str, list[int]] = {"greedy": [0, 0], "sampled": [0, 0]}  # drafted tokens kept, drafted

    def answers_rate(drafts: DraftSettings, sampled: bool = False) -> float:
        """Decode tokens/s of the engine answering DRAFT_QUESTIONS one by one (first token to last, prefill excluded).

        ``sampled``: at temperature 0.7, top-p 0.9, question i with seed i (the same text with drafts or without)."""
        engine = engines[fmt]
        engine.drafts = drafts
        seconds = tokens = 0.0
        before = engine.accepted_draft_tokens, engine.drafted_tokens
        try:
            for i, text in enumerate(prompts[:DRAFT_QUESTIONS]):
                if engine.prefix_cache is not None:
                    engine.prefix_cache.forget()  # the same prompts again would be copied, not run
                sampling = Sampling(max_new_tokens=args.draft_new_tokens, **(dict(temperature=0.7, top_p=0.9, seed=i) if sampled else {}))
                times = [time.perf_counter() for _ in engine.stream([GenerationRequest.single(text, "a0", sampling)])]
                seconds, tokens = seconds + times[-1] - times[0], tokens + len(times) - 1
        finally:
            engine.drafts = DraftSettings()
        counts = kept_drafts["sampled" if sampled else "greedy"]
        counts[0] += engine.accepted_draft_tokens - before[0]
        counts[1] += engine.drafted_tokens - before[1]
        return tokens / seconds

    def hf_answers_rate() -> float:
        """The same answers by HF generate on the fp32 peft model (greedy, to the end of sequence: the same tokens)."""
        from transformers import LogitsProcessorList

        model = hf_models["fp32"]
        model.set_adapter("a0")
        seconds = tokens = 0.0
        for text in prompts[:DRAFT_QUESTIONS]:
            clock = StepClock()
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=args.draft_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               logits_processor=LogitsProcessorList([clock]))
            seconds, tokens = seconds + clock.times[-1] - clock.times[0], tokens + len(clock.times) - 1
        return tokens / seconds

    drafting: list[float] | None = None
    if args.draft_tokens:
        with_drafts = DraftSettings(tokens=args.draft_tokens)
        drafting = alternate(
            lambda: answers_rate(DraftSettings()), lambda: answers_rate(with_drafts), hf_answers_rate,
            lambda: answers_rate(DraftSettings(), sampled=True), lambda: answers_rate(with_drafts, sampled=True),
        )
    naive = None
    if not args.quick:
        peft_model = fp32.model

        def naive_loop() -> None:
            for i, prompt in enumerate(prompts):
                peft_model.set_adapter(names[i % 4])
                inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                with torch.inference_mode():
                    peft_model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        naive = len(prompts) * args.tokens / best_time(naive_loop, 1)

    # -- report ----------------------------------------------------------------------------
    label = {"native": "fp32", "bf16": "bf16", "int8": "int8"}
    print()
    print(f"decode tokens/s ({args.tokens} new tokens, one adapter on every row)")
    print(f"{'B':>3s}" + "".join(f" {'engine ' + label[f]:>12s} {'ceiling ' + label[f]:>13s} {'ratio':>6s}" for f in engines)
          + "".join(f" {'HF ' + d:>9s}" for d in hf_models))
    for b in batches:
        print(f"{b:3d}" + "".join(f" {decode[f, b]:12.1f} {ceiling[f, b]:13.1f} {decode[f, b] / ceiling[f, b]:6.2f}" for f in engines)
              + "".join(f" {hf.get((d, b), float('nan')):9.1f}" for d in hf_models))
    for kind, texts in (("bare", prompts), ("5-shot", kshot)):
        print(f"prefill tokens/s, {len(texts)} {kind} prompts ({prefill_rows[kind]} tokens): "
              + ", ".join(f"{label[f]} {prefill[f, kind]:.0f} of {prefill_ceiling[f, kind]:.0f}" for f in engines))
    print("B=16, 4 adapters mixed: " + ", ".join(f"{label[f]} {mixed[f]:.1f} tokens/s (one adapter beside it {mixing[f][0]:.1f})" for f in engines)
          + (f"; naive set_adapter+generate {naive:.1f}" if naive else ""))
    for dtype in hf_models:
        print(f"engine {label[fmt]} in alternation with HF generate on the {dtype} model: B=1 {beside_hf[dtype, 1]:.1f} vs {hf[dtype, 1]:.1f}, "
              f"B=16 {beside_hf[dtype, 16]:.1f} vs {hf[dtype, 16]:.1f} tokens/s")
    if drafting is not None:
        (g_kept, g_drafted), (s_kept, s_drafted) = kept_drafts["greedy"], kept_drafts["sampled"]
        print(f"B=1, {DRAFT_QUESTIONS} answers one by one to their end (at most {args.draft_new_tokens} tokens), decode tokens/s in alternation: "
              f"greedy: engine {drafting[0]:.1f}, engine with {args.draft_tokens} draft tokens {drafting[1]:.1f} ({g_kept} of {g_drafted} drafted tokens kept), "
              f"HF generate {drafting[2]:.1f}; sampled (T 0.7, top-p 0.9, seeded): engine {drafting[3]:.1f}, "
              f"with drafts {drafting[4]:.1f} ({s_kept} of {s_drafted} kept)")
    print(f"ratios below: the engine on {label[fmt]} weights against the ceiling of the same weights; HF generate on the fp32 model")
    chart = _chart(batches, decode, ceiling, hf, resolved.name, label)
    print(f"chart: {chart}")
    result = {
        "engine_vs_hf": beside_hf["fp32", 16] / hf["fp32", 16],
        "b1_vs_hf": beside_hf["fp32", 1] / hf["fp32", 1],
        "mixed_vs_single": mixing[fmt][1] / mixing[fmt][0],
        "mixed_vs_naive": mixed[fmt] / naive if naive else float("nan"),
        "b1_vs_ceiling": decode[fmt, 1] / ceiling[fmt, 1],
        "b16_vs_ceiling": decode[fmt, 16] / ceiling[fmt, 16],
        "b32_vs_ceiling": decode[fmt, 32] / ceiling[fmt, 32],
        "prefill_vs_ceiling": prefill[fmt, "bare"] / prefill_ceiling[fmt, "bare"],
        "prefill_5shot_vs_ceiling": prefill[fmt, "5-shot"] / prefill_ceiling[fmt, "5-shot"],
    }
    result.update({f"{label[f]}_vs_fp32_b16": decode[f, 16] / decode["native", 16] for f in engines if f != "native"})
    if "bf16" in hf_models:
        result["engine_vs_hf_bf16"] = beside_hf["bf16", 16] / hf["bf16", 16]
    if drafting is not None:
        result["b1_answers_vs_hf"] = drafting[0] / drafting[2]
        result["b1_drafts_vs_hf"] = drafting[1] / drafting[2]
        result["b1_sampled_drafts_gain"] = drafting[4] / drafting[3]
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


def _with_adapters(engine: Any, adapters: dict[str, Path]) -> Any:
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def kshot_prompts(shots: int) -> list[str]:
    """One ``shots``-shot prompt per question, as evaluation writes them, each with demonstrations of its own."""
    from carve.engine.templates import kshot_prompt
    from carve.specialize.seeds import load_seed_set

    seeds = load_seed_set(Path(__file__).parent.parent / "seeds" / "biomedical").seeds
    return [kshot_prompt(seeds[i * shots:(i + 1) * shots], q) for i, q in enumerate(QUESTIONS)]


def _load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def _chart(batches: tuple[int, ...], decode: dict, ceiling: dict, hf: dict, model: str, label: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = OUT_DIR / "engine.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"native": "#4C72B0", "bf16": "#C44E52", "int8": "#DD8452"}
    for fmt in sorted({f for f, _ in decode}, key=list(colours).index):
        ax.plot(batches, [decode[fmt, b] for b in batches], "o-", color=colours[fmt], label=f"engine, {label[fmt]} weights")
        ax.plot(batches, [ceiling[fmt, b] for b in batches], "--", color=colours[fmt], label=f"ceiling, {label[fmt]} products only")
    for dtype, marker in (("fp32", "s:"), ("bf16", "^:")):
        points = sorted(b for d, b in hf if d == dtype)
        if points:
            ax.plot(points, [hf[dtype, b] for b in points], marker, color="#55A868", label=f"HF generate (peft, {dtype} model)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows decoded together)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput vs batch size, {model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
