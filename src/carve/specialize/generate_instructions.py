"""Stage 1: instruction generation (paper §3.2) with self-instruct filtering.

Prompts are numbered 0, 1, 2...; prompt i shows seeds drawn with a generator
seeded from (run seed, iteration, i) and samples with its own seed, so a
prompt's text never depends on which other prompts share its batch or on
whether the run was interrupted. Prompts decode ``instruction_batch`` rows at a
time, the next prompt joining as soon as a row frees (offline continuous
batching), and every finished generation is appended to ``generations.jsonl``
at once; the filters read generations strictly in prompt order, so the kept
list is the same whether or not the run was resumed. Generation stops at the
prompt that brings the kept count to ``num_instructions``.

Iteration 2 (paper §3.5) generates a *fresh* set with the specialized
adapter decoding contrastively against the base (eq. 3, engine rule
``contrast`` with the same sampling settings); the near-duplicate filter then
also compares against iteration 1's instructions.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from carve.common.progress import stage
from carve.specialize.config import RunConfig
from carve.specialize.filters import DuplicateIndex, FilterSettings, check_pair, empty_counts, seed_index
from carve.specialize.fluency import Scorer, engine_scorer, fluency_limit, pair_text
from carve.specialize.prompts import NEXT_ITEM, NO_INPUT_LINE, instruction_prompt, parse_task_list
from carve.specialize.seeds import SeedSet
from carve.specialize.store import JsonlStore, write_atomic, write_jsonl_atomic

GENERATIONS = "generations.jsonl"
INSTRUCTIONS = "instructions.jsonl"
REJECTED = "rejected.jsonl"
FILTER_COUNTS = "filter_counts.json"


def derive_seed(*parts: Any) -> int:
    """A stable 62-bit seed from the run seed and an item's coordinates."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


@dataclass
class FilterState:
    """The filters applied so far, in prompt order."""

    settings: FilterSettings
    duplicates: DuplicateIndex
    require_input: bool = True
    fluency: tuple[Scorer, float] | None = None  # (base-model scorer, highest mean NLL accepted)
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=empty_counts)
    parsed: int = 0
    processed: int = 0  # prompts read so far (all prompts < processed)

    def feed(self, generation: dict[str, Any], prefix: str, limit: int) -> None:
        """Filter one prompt's generated items; stop keeping once ``limit`` items are kept."""
        items = parse_task_list(generation["text"], truncated=generation["finish_reason"] == "length")
        for position, item in enumerate(items):
            if len(self.kept) >= limit:
                break
            self.parsed += 1
            record = {"id": f"{prefix}-{generation['prompt']:05d}-{position}", "instruction": item.instruction, "input": item.input, "prompt": generation["prompt"]}
            problem = None if item.problem == NO_INPUT_LINE and not self.require_input else item.problem
            verdict: tuple[str, str] | None = ("malformed", problem) if problem else check_pair(item.instruction, item.input, self.settings)
            if verdict is None:
                score, other = self.duplicates.most_similar(item.instruction)
                if other >= 0:
                    verdict = ("near_duplicate", f"ROUGE-L {score:.2f} with a kept instruction (#{other})")
            if verdict is None and self.fluency is not None:  # last: the only check that runs the model
                scorer, limit = self.fluency
                nll = scorer([pair_text(item.instruction, item.input)])[0]
                if nll > limit:
                    verdict = ("disfluent", f"mean NLL {nll:.2f} > {limit:.2f} (least fluent seed + margin)")
            if verdict is not None:
                self.counts[verdict[0]] += 1
                self.rejected.append({**record, "filter": verdict[0], "reason": verdict[1]})
                continue
            self.duplicates.add(item.instruction)
            self.kept.append(record)
        self.processed += 1


def _request(config: RunConfig, seed_set: SeedSet, tokenizer: Any, index: int, iteration: int, adapter: str | None) -> tuple[Any, list[int]]:
    from carve.engine.decoding import Branch, GenerationRequest, Sampling

    rng = random.Random(derive_seed(config.seed, "seeds", iteration, index))
    chosen = sorted(rng.sample(range(len(seed_set.seeds)), min(config.seeds_per_prompt, len(seed_set.seeds))))
    chosen_order = chosen[:]
    rng.shuffle(chosen_order)
    prompt = instruction_prompt(seed_set.domain, [seed_set.seeds[i] for i in chosen_order], tokenizer, config.prompt_style, config.seed_input_chars)
    sampling = Sampling(
        max_new_tokens=config.instruction_max_new_tokens,
        temperature=config.instruction_temperature,
        top_p=config.instruction_top_p,
        seed=derive_seed(config.seed, "sample", iteration, index),
        stop=(NEXT_ITEM,) if config.first_item_only else (),
        alpha=config.contrast_alpha,
    )
    if adapter is None:
        return GenerationRequest.single(prompt, None, sampling), chosen_order
    # iteration 2: the specialized model decodes contrastively against the base (eq. 3)
    return GenerationRequest((Branch(prompt, adapter), Branch(prompt, None)), "contrast", sampling), chosen_order


@dataclass
class InstructionResult:
    kept: list[dict[str, Any]]
    counts: dict[str, int]
    prompts: int
    parsed: int
    generated_tokens: int


def generate_instructions(
    engine: Any,
    config: RunConfig,
    seed_set: SeedSet,
    folder: Path,
    iteration: int = 1,
    adapter: str | None = None,
    avoid: list[str] | None = None,
) -> InstructionResult:
    """Generate until ``num_instructions`` pairs pass the filters; resumes from ``generations.jsonl``.

    ``avoid`` holds instructions the new ones must not near-duplicate besides
    the seeds (iteration 2 asks for a fresh set, distinct from iteration 1's).
    """
    settings = FilterSettings(config.min_instruction_words, config.max_instruction_words, config.max_input_chars, config.rouge_threshold)
    pool = [s.instruction for s in seed_set.seeds] + list(avoid or [])
    fluency = None
    if config.fluency_margin is not None:
        scorer = engine_scorer(engine)
        limit = fluency_limit(scorer([pair_text(s.instruction, s.input[: config.max_input_chars]) for s in seed_set.seeds]), config.fluency_margin)
        fluency = (scorer, limit)
    state = FilterState(settings, seed_index(pool, config.rouge_threshold), config.require_input, fluency)
    store = JsonlStore(folder / GENERATIONS, key_field="prompt")
    target, cap = config.num_instructions, config.max_prompt_count()
    prefix = f"it{iteration}"
    rows_per_prompt = 1 if adapter is None else 2  # contrast decodes a row with the adapter and one without
    asked: list[tuple[int, list[int]]] = []  # (prompt, its seeds) in the order the engine was given them
    fed = 0  # prompts 0 .. fed-1 have been through the filters

    def enough() -> bool:
        return len(state.kept) >= target or fed >= cap

    def missing_requests() -> Iterator[Any]:
        """The next prompts without a generation, made only when the engine has a free row and more are still wanted."""
        for i in range(cap):
            if enough():
                return
            if i not in store:
                request, chosen = _request(config, seed_set, engine.tokenizer, i, iteration, adapter)
                asked.append((i, chosen))
                yield request

    with stage(f"instructions (iteration {iteration})", target, "instructions") as progress:

        def feed_in_order() -> None:
            nonlocal fed
            before = len(state.kept)
            while not enough() and fed in store:
                state.feed(store.items[fed], prefix, target)
                fed += 1
            progress.advance(len(state.kept) - before, note=f"{state.processed} prompts, {sum(state.counts.values())} filtered")

        feed_in_order()  # what a resumed run generated before
        if not enough():
            for position, c in engine.complete(missing_requests(), max_rows=config.instruction_batch * rows_per_prompt):
                i, chosen = asked[position]
                store.append([{"prompt": i, "seeds": chosen, "text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}])
                feed_in_order()
                if enough():
                    break  # the rows still running are dropped

    write_jsonl_atomic(folder / INSTRUCTIONS, state.kept)
    write_jsonl_atomic(folder / REJECTED, state.rejected)
    summary = {"prompts": state.processed, "parsed": state.parsed, "kept": len(state.kept), "removed": state.counts,
               "fluency_limit": fluency[1] if fluency else None}
    write_atomic(folder / FILTER_COUNTS, json.dumps(summary, indent=2))
    tokens = sum(store.items[i]["tokens"] for i in range(state.processed))
    return InstructionResult(state.kept, state.counts, state.processed, state.parsed, tokens)
