"""Self-specialization costs on the real SmolLM2: marginalized responses, training, quick profile.

(a) Response generation with k=5 marginalized document branches (eq. 2), greedy,
    a fixed number of new tokens per response (EOS ignored), on real generated-style
    instructions and PubMed documents retrieved by BM25:
      engine  - one batch holds every branch of every request, one forward per step;
      naive   - the same math with k separate forward passes (one KV cache per branch)
                per request per decoding step, combined by the same `combine`.
    Both must produce the same tokens (checked); examples/minute of each and the ratio.
(b) LoRA training throughput (examples/second) with the quick profile's settings,
    and the training loss on k-shot seed micro-batches two ways: the vocabulary
    projection only where a response token is learned (carve) against full logits
    (the usual causal-LM loss); both must give the same loss (checked).
(c) Wall time of each stage of the quick profile, read from a finished run's run.json
    (default /work/runs/quick-smollm2, produced by `carve specialize --profile quick`).

Run: ../shared/tools/offline .venv/bin/python benchmarks/specialize.py [--requests 8] [--run DIR]
Target: engine >= 2.5 x naive.
Last line: RESULT branches_vs_naive=<ratio> learned_vs_full_logits=<ratio> quick_profile_s=<seconds> kept_examples=<n>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import OUT_DIR, bar_chart, timer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS = [
    ("Identify the drug mentioned in the abstract and its indication.", "Metformin remains first-line therapy for type 2 diabetes in adults."),
    ("Does the study report a reduction in mortality?", "Patients given early antibiotics had lower 30-day mortality than controls."),
    ("Name the gene whose mutation is described.", "Germline BRCA1 mutations raise the lifetime risk of breast cancer."),
    ("Summarize the main finding in one sentence.", "Neonatal superficial cultures rarely changed antibiotic decisions."),
    ("Which organism causes the infection described?", "Oral candidosis is common in infants and immunosuppressed patients."),
    ("Classify the sentence as treatment, diagnosis or prognosis.", "CT scanning detected early-stage lung nodules in smokers."),
    ("What adverse effect is reported?", "Itraconazole caused mild nausea in a minority of patients."),
    ("Extract the anatomical structure mentioned.", "Inflammation of the renal cortex was seen on biopsy."),
]


def naive_marginal(engine, requests, new_tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Eq. 2 done the straightforward way: each branch its own forward pass and cache at every step."""
    import torch

    from carve.engine.decoding import combine, pick_token

    outputs = []
    model = engine.model
    with torch.inference_mode():
        for request in requests:
            caches, logits = [], []
            for branch in request.branches:
                ids = torch.tensor([engine.encode(branch.prompt)])
                cache = engine.new_cache(0, "peft")
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                caches.append(cache)
                logits.append(out.logits[:, -1, :])
            tokens: list[int] = []
            for step in range(new_tokens):
                logprobs = torch.log_softmax(torch.cat(logits).float(), dim=-1)
                token = pick_token(combine(logprobs, "mixture", [b.weight for b in request.branches]), request.sampling, None)
                tokens.append(token)
                if step + 1 == new_tokens:
                    break
                step_ids = torch.tensor([[token]])
                logits = [model(input_ids=step_ids, past_key_values=c, use_cache=True, logits_to_keep=1).logits[:, -1, :] for c in caches]
            outputs.append(tokens)
    return outputs


def bench_responses(args: argparse.Namespace) -> tuple[float, float, bool]:
    from carve.engine.loading import open_engine
    from carve.specialize.config import build_config
    from carve.specialize.responses import build_request
    from carve.specialize.retrieval import BM25Index, load_corpus, softmax
    from carve.specialize.seeds import load_seed_set

    engine, _, _ = open_engine(args.model)
    engine.eos_ids = set()  # fixed-length responses: both sides decode exactly --new-tokens
    config = build_config("quick", top_k=args.k, response_max_new_tokens=args.new_tokens, document_words=args.doc_words)
    domain = load_seed_set(ROOT / "seeds" / "biomedical").domain
    corpus = load_corpus(ROOT / "data" / "corpus" / "pubmed_sample.jsonl")
    documents = {d.id: d for d in corpus.documents}
    with tempfile.TemporaryDirectory() as cache:
        index = BM25Index.open(corpus, Path(cache))
        items = [{"id": str(i), "instruction": ins, "input": inp} for i, (ins, inp) in enumerate(INSTRUCTIONS[: args.requests])]
        hits = index.search([f"{i['instruction']}\n{i['input']}" for i in items], args.k)
    requests = []
    for item, row in zip(items, hits):
        hit = {"docs": [corpus.documents[d].id for d, _ in row], "weights": softmax([s for _, s in row])}
        requests.append(build_request(config, domain, engine.tokenizer, item, hit, documents))
    # no stop strings: both sides produce exactly new_tokens tokens
    from dataclasses import replace

    requests = [replace(r, sampling=replace(r.sampling, stop=())) for r in requests]
    engine.generate(requests[:1])  # warm up
    with timer() as batched:
        completions = engine.generate(requests)
    with timer() as naive:
        reference = naive_marginal(engine, requests, args.new_tokens)
    same = [c.token_ids for c in completions] == reference
    per_min = lambda seconds: len(requests) / seconds * 60  # noqa: E731
    print(f"(a) k={args.k} marginalized responses, {len(requests)} requests x {args.new_tokens} tokens, "
          f"{sum(len(engine.encode(b.prompt)) for r in requests for b in r.branches) // (len(requests) * args.k)} prompt tokens per branch")
    print(f"    engine (branches batched): {batched[0]:7.1f} s  {per_min(batched[0]):6.2f} examples/min")
    print(f"    naive (k passes per step): {naive[0]:7.1f} s  {per_min(naive[0]):6.2f} examples/min")
    print(f"    same tokens: {same}")
    return per_min(batched[0]), per_min(naive[0]), same


def bench_training(args: argparse.Namespace) -> float:
    from carve.engine.models import resolve_model
    from carve.specialize.config import build_config
    from carve.specialize.training import train_lora

    config = build_config("quick").training.model_copy(update={"epochs": 1, "save_every_steps": 0})
    examples = [
        {"instruction": ins, "input": inp, "output": "The text describes " + inp.lower() + " This is consistent with the literature."}
        for ins, inp in INSTRUCTIONS * (args.train_examples // len(INSTRUCTIONS))
    ]
    with tempfile.TemporaryDirectory() as folder:
        result = train_lora(resolve_model(args.model).path, examples, config, Path(folder), seed=0)
    rate = result.examples_per_second or 0.0
    print(f"(b) LoRA r=8 all-linear training, {result.examples} examples, micro-batch {config.micro_batch_size}, "
          f"effective batch {config.batch_size}, max length {config.max_length}: {rate:.3f} examples/s "
          f"(loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})")
    return rate


def bench_loss(args: argparse.Namespace) -> float:
    """Seconds per micro-batch (forward + backward) of the learned-positions loss and of full logits; returns full / learned."""
    from peft import LoraConfig, get_peft_model

    from carve.engine.models import resolve_model
    from carve.engine.templates import Demonstration
    from carve.specialize.config import build_config
    from carve.specialize.run import seed_examples
    from carve.specialize.seeds import load_seed_set
    from carve.specialize.training import IGNORE, _collate, encode_example, load_for_training, response_loss

    config = build_config("quick")
    model, tokenizer, _ = load_for_training(resolve_model(args.model).path, False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    shown = [e for e in seed_examples(load_seed_set(ROOT / "seeds" / "biomedical"), config.seed_demonstrations) if "demos" in e]
    size = config.training.micro_batch_size
    encoded = [encode_example(tokenizer, e["instruction"], e["input"], e["output"], config.training.max_length, [Demonstration(**d) for d in e["demos"]]) for e in shown]
    fitting = sorted((e for e in encoded if e is not None), key=lambda e: len(e.input_ids))[: size * args.loss_batches]
    batches = [_collate(fitting[i : i + size], int(tokenizer.pad_token_id)) for i in range(0, len(fitting), size)]

    def full_logits(model, micro):  # type: ignore[no-untyped-def]
        """transformers' own causal-LM loss (a mean over the learned tokens), summed like response_loss."""
        return model(**micro).loss * int((micro["labels"][:, 1:] != IGNORE).sum())

    seconds, losses = {}, {}
    for name, loss_of in (("learned positions", response_loss), ("full logits", full_logits)):
        spent, values = 0.0, []
        for micro in batches:
            with timer() as elapsed:
                loss = loss_of(model, micro)
                loss.backward()
            model.zero_grad(set_to_none=True)
            spent += elapsed[0]
            values.append(loss.item())
        seconds[name], losses[name] = spent / len(batches), values
    same = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(losses["learned positions"], losses["full logits"]))
    tokens = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    width = sum(b["input_ids"].numel() for b in batches)
    print(f"(b2) training loss, {len(batches)} micro-batches of {size} k-shot seeds ({width} positions, {tokens} learned): "
          f"learned positions {seconds['learned positions']:.2f} s, full logits {seconds['full logits']:.2f} s per micro-batch "
          f"-> {seconds['full logits'] / seconds['learned positions']:.2f}x; same loss: {same}")
    if not same:
        raise SystemExit("the two losses differ")
    return seconds["full logits"] / seconds["learned positions"]


def quick_profile(run: Path) -> tuple[float | None, int | None]:
    manifest = run / "run.json"
    if not manifest.is_file():
        print(f"(c) no quick-profile run at {run}: run `carve specialize seeds/biomedical --corpus data/corpus/pubmed_sample.jsonl --profile quick --out {run}`")
        return None, None
    data = json.loads(manifest.read_text())
    timings = data.get("timings_s", {})
    print(f"(c) quick profile stages ({run}):")
    for name, seconds in timings.items():
        print(f"    {name:<22} {seconds:8.1f} s")
    total = sum(timings.values())
    finished = "finished_at" in data
    print(f"    {'total':<22} {total:8.1f} s {'(finished)' if finished else '(NOT finished: partial)'}")
    kept = data.get("counts", {}).get("training", {}).get("examples")
    return (round(total, 1) if finished else None), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--doc-words", type=int, default=80)
    parser.add_argument("--train-examples", type=int, default=16)
    parser.add_argument("--loss-batches", type=int, default=6)
    parser.add_argument("--run", type=Path, default=Path("/work/runs/quick-smollm2"))
    args = parser.parse_args()

    engine_rate, naive_rate, same = bench_responses(args)
    train_rate = bench_training(args)
    loss_ratio = bench_loss(args)
    quick_s, kept = quick_profile(args.run)
    ratio = engine_rate / naive_rate
    print(f"target: engine >= 2.5 x naive -> {ratio:.2f} x {'met' if ratio >= 2.5 else 'NOT met'}; tokens identical: {same}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    bar_chart(OUT_DIR / "specialize.png", "k=5 marginalized response generation", ["engine (batched branches)", "naive (k passes/step)"],
              [engine_rate, naive_rate], "examples / minute")
    (OUT_DIR / "specialize.json").write_text(json.dumps(
        {"engine_examples_per_min": engine_rate, "naive_examples_per_min": naive_rate, "ratio": ratio, "same_tokens": same,
         "training_examples_per_s": train_rate, "learned_vs_full_logits": loss_ratio, "quick_profile_s": quick_s, "kept_examples": kept}, indent=2))
    print(f"RESULT branches_vs_naive={ratio:.2f} learned_vs_full_logits={loss_ratio:.2f} quick_profile_s={quick_s if quick_s is not None else 'NA'} kept_examples={kept if kept is not None else 'NA'}")


if __name__ == "__main__":
    main()
