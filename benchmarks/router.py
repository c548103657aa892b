"""Router benchmark: auto-routing accuracy on the dev sets, and the cost of a 2-adapter mixture.

Two adapters are registered on the real SmolLM2 base, profiled with their
seed sets (seeds/biomedical, seeds/finance) plus the synthetic instructions of
a real specialization run when one is found (--runs, default /work/runs). The
adapters' weights are a real run's adapter when present, else random LoRA
weights (common.make_random_adapters): routing reads only the profiles, and
the cost of decoding does not depend on what the weights learnt.

1. Auto routing over the dev examples of ../shared/data/biomed/dev and
   ../shared/data/finance/dev (--limit per task), under two request texts:
   instruction + input (what a request carries; the headline) and the input
   alone (a stress test: the dev tasks' instructions are word for word the
   seeds', the inputs are unseen). A fallback to base counts as a miss. Also:
   how many of 20 general-purpose prompts are (wrongly) sent to an adapter.
   Embeddings, and the BM25 fallback.
2. Decoding cost, batch of 1 and of 4 requests, --tokens new tokens each (EOS ignored), best of --rounds:
   one adapter; a 0.5/0.5 mixture in output space (engine 'mixture' rule, 2
   branches); the same mixture in weight space (peft 'cat' merge, cached; its
   one-off build time reported apart).

Last line: RESULT route_acc=<fraction> mix_out_vs_single=<ratio> mix_merged_vs_single=<ratio>
(route_acc: instruction + input, embeddings; ratios: time per request against one adapter, batch of 1).

Run: ../shared/tools/offline .venv/bin/python benchmarks/router.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import OUT_DIR, make_random_adapters, timer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DOMAINS = {"biomedical": ("biomedical", DATA / "biomed" / "dev"), "finance": ("finance", DATA / "finance" / "dev")}
NEW_TOKENS = 32
# General-purpose requests no biomedical or finance adapter should take (the base answers them).
OFF_DOMAIN = [
    "Write a short rhyming poem about a cat sleeping in the garden sun.", "How do I reverse a list in Python?",
    "Plan a three-day trip to Rome with museums and food.", "What is the capital of Australia?", "Give me a recipe for banana bread.",
    "Explain the offside rule in football.", "Translate 'good morning' into French and Spanish.", "Who wrote Pride and Prejudice?",
    "Summarize the plot of the movie Inception.", "What are good exercises for lower back strength?", "How does a rainbow form?",
    "Write an email asking my landlord to fix the heating.", "What is the difference between TCP and UDP?",
    "Suggest names for a golden retriever puppy.", "How do I change a flat tire on a bicycle?", "List the planets of the solar system in order.",
    "Tell me a joke about programmers.", "What should I pack for a camping weekend?", "Explain how a bill becomes a law in the United States.",
    "Describe the rules of castling in chess.",
]
PROMPTS = [
    "Which gene is most often mutated in hereditary breast cancer?",
    "Classify the sentiment of: Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.",
    "Name the disease in: The child had measles and recovered.",
    "Find the organizations in: The Borrower shall repay the Lender, Silicon Valley Bank.",
]


def find_run(runs: Path, tag: str) -> Path | None:
    """The newest finished specialization run for ``tag`` (its packaged adapter's card names the tag)."""
    if not runs.is_dir():
        return None
    for card in sorted(runs.glob("*/adapter/carve-card.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            if json.loads(card.read_text())["domain"]["tag"] == tag:
                return card.parent.parent
        except (KeyError, ValueError):
            continue
    return None


def profile_records(domain: str, run: Path | None) -> list[dict[str, str]]:
    seeds = [json.loads(line) for line in (REPO / "seeds" / domain / "seeds.jsonl").read_text().splitlines() if line.strip()]
    records = [{"source": "seed", "instruction": s["instruction"], "input": s.get("input", "")} for s in seeds]
    if run is not None and (run / "instructions.jsonl").is_file():
        for line in (run / "instructions.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records.append({"source": "synthetic", "instruction": r["instruction"], "input": r.get("input", "")})
    return records


def dev_examples(folder: Path, limit: int | None) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out += rows[:limit] if limit else rows
    return out


def build_registry(root: Path, base: Any, runs: Path, work: Path) -> dict[str, str]:
    """Register one adapter per domain (real run adapter when found, else random weights) with its profile file."""
    from carve.adapters.registry import Registry

    registry = Registry(root)
    origin: dict[str, str] = {}
    random_dirs = make_random_adapters(base.path, list(DOMAINS), work / "random", rank=8, seed=0)
    for tag, (domain, _) in DOMAINS.items():
        run = find_run(runs, tag)
        source = run / "adapter" if run is not None and (run / "adapter" / "adapter_model.safetensors").is_file() else random_dirs[tag]
        folder = shutil.copytree(source, work / f"adapter-{tag}")
        records = profile_records(domain, run)
        (folder / "carve-profile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        registry.add(folder, tag, tags=[tag], base=base)
        synthetic = sum(r["source"] == "synthetic" for r in records)
        origin[tag] = f"{'run ' + run.name if run is not None else 'random weights'}; profile {len(records) - synthetic} seeds + {synthetic} synthetic"
    return origin


def routing_accuracy(router: Any, limit: int | None) -> dict[str, dict[str, Any]]:
    """Per text condition: accuracy and base fallbacks per domain and overall; off-domain prompts sent to an adapter."""
    results: dict[str, dict[str, Any]] = {}
    for condition in ("instruction+input", "input"):
        per: dict[str, dict[str, int]] = {}
        for tag, (_, folder) in DOMAINS.items():
            examples = dev_examples(folder, limit)
            texts = [e["input"] if condition == "input" else f"{e['instruction']}\n{e['input']}" for e in examples]
            decisions = router.route_auto_many(texts)
            per[tag] = {
                "n": len(decisions),
                "base": sum(d.is_base for d in decisions),
                "right": sum((not d.is_base) and d.uses()[0]["name"] == tag for d in decisions),
            }
        n = sum(s["n"] for s in per.values())
        results[condition] = {
            "accuracy": sum(s["right"] for s in per.values()) / n,
            "base_rate": sum(s["base"] for s in per.values()) / n,
            "per_domain": {t: {"accuracy": s["right"] / s["n"], "base_rate": s["base"] / s["n"], "n": s["n"]} for t, s in per.items()},
        }
    off = router.route_auto_many(OFF_DOMAIN)
    results["off_domain"] = {"n": len(off), "routed_to_adapter": sum(not d.is_base for d in off) / len(off)}
    sample = [e["input"] for e in dev_examples(DOMAINS["biomedical"][1], 2)][:10]
    with timer() as elapsed:
        for text in sample:
            router.route("auto", text)
    results["ms_per_route"] = 1000 * elapsed[0] / len(sample)
    return results


def decode_costs(base: Any, registry: Any, rounds: int, new_tokens: int) -> dict[str, Any]:
    """Seconds per request of single / output-space mixture / weight-space mixture, batches of 1 and 4."""
    from carve.engine.adapter_cache import AdapterCache
    from carve.engine.batching import engine_request
    from carve.engine.decoding import GenerationRequest, Sampling
    from carve.engine.loading import open_engine
    from carve.engine.text import format_user_prompt
    from carve.router import Router

    records = {tag: registry.get(tag) for tag in DOMAINS}
    engine, _, plan = open_engine(str(base.path), [(f"{r.name}@v{r.version}", r.path) for r in records.values()])
    name = lambda record: f"{record.name}@v{record.version}"  # noqa: E731
    router = Router(registry)
    single = router.route("biomedical")
    mixture = router.route("auto", "", {"mix": {"biomedical": 0.5, "finance": 0.5}})
    merged_decision = router.route("auto", "", {"mix": {"biomedical": 0.5, "finance": 0.5}, "space": "weights"})
    sampling = Sampling(max_new_tokens=new_tokens, ignore_eos=True)
    cache = AdapterCache(engine, capacity=2, merge_capacity=2)
    with timer() as build:
        merged = cache.merge(merged_decision.weighted(), name)
    with timer() as hit:
        assert cache.merge(merged_decision.weighted(), name) == merged
    prompts = [format_user_prompt(engine.tokenizer, p) for p in PROMPTS]

    def requests(kind: str, batch: int) -> list[Any]:
        chosen = prompts[:batch]
        if kind == "single":
            return [engine_request(single.weighted(), p, sampling, name) for p in chosen]
        if kind == "output":
            return [engine_request(mixture.weighted(), p, sampling, name) for p in chosen]
        return [GenerationRequest.single(p, merged, sampling) for p in chosen]

    out: dict[str, Any] = {"plan": plan.describe(), "merge_build_s": build[0], "merge_cache_hit_s": hit[0]}
    engine.generate(requests("single", 1))  # warm up
    for batch in (1, 4):
        best = {kind: float("inf") for kind in ("single", "output", "weights")}
        for _ in range(rounds):  # interleaved, so a load spike from other processes hits every kind alike
            for kind in best:
                with timer() as elapsed:
                    results = engine.generate(requests(kind, batch))
                assert all(len(r.token_ids) == new_tokens for r in results)
                best[kind] = min(best[kind], elapsed[0])
        for kind, seconds in best.items():
            out[f"{kind}_b{batch}_s_per_request"] = seconds / batch
    return out


def main() -> None:
    import torch

    torch.set_num_threads(1)  # the machine is shared: one thread gives steadier timings than two contending ones
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=Path, default=Path("/work/runs"), help="Where finished specialization runs may be.")
    parser.add_argument("--limit", type=int, default=None, help="Dev examples per task (default: all).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS, help="New tokens per request in the cost measurement.")
    args = parser.parse_args()

    from carve.engine.models import resolve_model
    from carve.router import Router
    from carve.router.profiles import BM25Scorer, EmbeddingScorer, embedding_available

    base = resolve_model(args.model)
    report: dict[str, Any] = {"model": base.name}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from carve.adapters.registry import Registry

        report["adapters"] = build_registry(work / "registry", base, args.runs, work)
        registry = Registry(work / "registry")
        for tag, origin in report["adapters"].items():
            print(f"adapter {tag}: {origin}", flush=True)

        scorers: dict[str, Any] = {"bm25": BM25Scorer()}
        if embedding_available():
            with timer() as load:
                scorer = EmbeddingScorer(registry.root)
                Router(registry, scorer=scorer).warm()
            report["embedding_load_and_profiles_s"] = load[0]
            scorers = {"embedding": scorer, **scorers}
        report["routing"] = {}
        for backend, scorer in scorers.items():
            router = Router(registry, scorer=scorer)
            results = routing_accuracy(router, args.limit)
            report["routing"][backend] = results
            threshold = router.config.threshold_for(scorer.backend)
            for condition in ("instruction+input", "input"):
                r = results[condition]
                domains = ", ".join(f"{t} {d['accuracy']:.3f} (base {d['base_rate']:.3f}, n={d['n']})" for t, d in r["per_domain"].items())
                print(f"routing {backend:9s} threshold {threshold:.2f} text={condition:17s} accuracy {r['accuracy']:.4f} "
                      f"base fallback {r['base_rate']:.4f} [{domains}]", flush=True)
            off = results["off_domain"]
            print(f"routing {backend:9s} off-domain prompts sent to an adapter: {off['routed_to_adapter']:.2f} of {off['n']}; "
                  f"{results['ms_per_route']:.1f} ms per single route() call", flush=True)

        costs = decode_costs(base, registry, args.rounds, args.tokens)
        report["costs"] = costs
    print(f"decoding: {costs['plan']}, {args.tokens} new tokens per request, best of {args.rounds}")
    for batch in (1, 4):
        s = costs[f"single_b{batch}_s_per_request"]
        o = costs[f"output_b{batch}_s_per_request"]
        w = costs[f"weights_b{batch}_s_per_request"]
        print(f"  batch {batch}: one adapter {s:.3f} s/request; output-space mixture {o:.3f} ({o / s:.2f}x); "
              f"weight-space merged {w:.3f} ({w / s:.2f}x)")
    print(f"  weight-space merge: built in {costs['merge_build_s']:.3f} s once per (adapters, weights), cache hit {1000 * costs['merge_cache_hit_s']:.3f} ms")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "router.json").write_text(json.dumps(report, indent=2))
    primary = report["routing"].get("embedding") or report["routing"]["bm25"]
    acc = primary["instruction+input"]["accuracy"]
    ratio_out = costs["output_b1_s_per_request"] / costs["single_b1_s_per_request"]
    ratio_merged = costs["weights_b1_s_per_request"] / costs["single_b1_s_per_request"]
    print(f"RESULT route_acc={acc:.4f} mix_out_vs_single={ratio_out:.3f} mix_merged_vs_single={ratio_merged:.3f}")


if __name__ == "__main__":
    main()
