"""The resumable self-specialization pipeline: one folder per run.

Layout of a run folder::

    run.json              manifest: config, seeds/corpus/base identity, stage timings and counts
    generations.jsonl     raw generations, one per instruction prompt (stage 1)
    instructions.jsonl    kept (instruction, input) pairs; rejected.jsonl with the filter and reason
    filter_counts.json    what each filter removed
    retrieval.jsonl       top-k documents, BM25 scores and p_ret per instruction (stage 2)
    responses.jsonl       one response per instruction (stage 3)
    training_set.jsonl    what training sees: kept responses and, if asked, the seeds, each with its source;
                          rejected_responses.jsonl with the response filter and reason
    seed_adapter/         training_set.jsonl, checkpoints/ and final/ of the adapter trained on the seeds
                          alone (stage 0), which writes the responses (respond_with) and/or which
                          stage 4 continues (train_from)
    train/                checkpoints/ and final/ (stage 4)
    iter2/                the same for the second iteration (stage 5, --iterations 2)
    evaluation/           with evaluation tasks: base, the seed adapter and the final adapter scored (results.json, report.md ...)
    adapter/              the packaged PEFT adapter with carve-card.json (stage 6): the final adapter, or the seed adapter
                          when the evaluation measured it higher (the card's evaluation.choice says which and why)

Everything is validated (seeds, corpus, base model, an existing folder's
manifest) before anything is written, so bad input leaves no folder behind.
Each stage resumes item by item from its own files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from carve.artifact import AdapterCard, CardDomain
from carve.specialize.config import RunConfig
from carve.specialize.retrieval import Corpus, load_corpus
from carve.specialize.seeds import SeedSet, load_seed_set
from carve.specialize.store import write_atomic, write_jsonl_atomic

if TYPE_CHECKING:  # pragma: no cover
    from carve.specialize.training import TrainResult

MANIFEST = "run.json"
ITERATION_2 = "iter2"
SEED_ADAPTER = "seed_adapter"
SEEDED = "seeded"
ADAPTER = "adapter"
SPECIALIZED = "specialized"
SEEDS_ONLY = "seeds_only"  # the evaluation labels of the choice between the stage-0 adapter and the final one
SELF_SPECIALIZED = "self_specialized"
TRAINING_SET = "training_set.jsonl"
REJECTED_RESPONSES = "rejected_responses.jsonl"


class RunError(ValueError):
    """A run that cannot start or resume; the message says why."""


@dataclass
class Inputs:
    """Validated inputs of a run: nothing on disk has been touched yet."""

    config: RunConfig
    seed_set: SeedSet
    corpus: Corpus | None
    base: Any  # ResolvedModel
    out: Path

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {
            "config": self.config.model_dump(mode="json"),
            "seeds_hash": self.seed_set.content_hash,
            "corpus_hash": self.corpus.content_hash if self.corpus else None,
            "base": {"name": self.base.name, "model_id": self.base.model_id, "fingerprint": self.base.fingerprint},
        }


def prepare(config: RunConfig, seeds: Path, corpus: Path | None, out: Path, resume: bool, eval_tasks: Path | None = None) -> Inputs:
    """Validate everything; raises SeedSetError, CorpusError, ModelError, SuiteError or RunError, writing nothing."""
    from carve.engine.models import resolve_model

    seed_set = load_seed_set(seeds)
    if eval_tasks is not None:
        from carve.evaluation.suite import load_suite

        load_suite(Path(eval_tasks))  # a bad task file fails now, not after an hour of training
    if corpus is None and config.retrieval != "none":
        raise RunError("a corpus is needed for retrieval: give --corpus FILE, or --retrieval none")
    if corpus is None and config.instances == "corpus":
        raise RunError("instances 'corpus' takes its task inputs from a corpus: give --corpus FILE")
    loaded = load_corpus(corpus) if corpus is not None else None
    base = resolve_model(config.base)
    inputs = Inputs(config, seed_set, loaded, base, Path(out))
    manifest = inputs.out / MANIFEST
    if inputs.out.exists() and any(inputs.out.iterdir()):
        if not resume:
            raise RunError(f"{inputs.out} already holds a run: add --resume to continue it, or choose another --out")
        if not manifest.is_file():
            raise RunError(f"{inputs.out} is not empty and has no {MANIFEST}: not a Carve run folder")
        recorded = json.loads(manifest.read_text())["identity"]
        differences = _differences(recorded, inputs.identity())
        if differences:
            raise RunError(f"cannot resume {inputs.out}: it was started with different inputs: " + "; ".join(differences))
    return inputs


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new else [f"{path}: {old!r} then, {new!r} now"]


@dataclass
class Manifest:
    """run.json, rewritten atomically after each stage."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, inputs: Inputs) -> "Manifest":
        path = inputs.out / MANIFEST
        if path.is_file():
            return cls(path, json.loads(path.read_text()))
        from carve.specialize.package import now_iso

        data = {"identity": inputs.identity(), "seeds_path": str(inputs.seed_set.path), "corpus_path": str(inputs.corpus.path) if inputs.corpus else None,
                "created_at": now_iso(), "timings_s": {}, "counts": {}, "stages_done": []}
        manifest = cls(path, data)
        manifest.save()
        return manifest

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2))

    def timed(self, name: str, work: Callable[[], Any]) -> Any:
        """Run a stage, adding its wall time to what earlier (interrupted) attempts spent."""
        started = time.monotonic()
        result = work()
        self.data["timings_s"][name] = round(self.data["timings_s"].get(name, 0.0) + time.monotonic() - started, 2)
        if name not in self.data["stages_done"]:
            self.data["stages_done"].append(name)
        self.save()
        return result


def seed_examples(seed_set: SeedSet, demonstrations: int = 0) -> list[dict[str, Any]]:
    """The seeds as training examples, in the form training_set.jsonl records them (also the seeds-only baseline's data).

    With ``demonstrations`` each seed comes twice: alone, and after that many
    other seeds picked as k-shot evaluation picks them (eval_prompts.pick_demos).
    Trained zero-shot only, an adapter learns to answer in its own way and
    stops reading the demonstrations in front of it: in issue 4's measurement
    the seed-trained adapters' gain over the base fell from +9 to +1 (k=0 to k=5).
    """
    from carve.evaluation.prompts import pick_demos

    examples: list[dict[str, Any]] = []
    for n, s in enumerate(seed_set.seeds):
        alone = {"id": f"seed-{n}", "source": "seed", "instruction": s.instruction, "input": s.input, "output": s.output}
        examples.append(alone)
        if demonstrations:
            shown = pick_demos(seed_set.seeds, s, demonstrations)
            demos = [{"instruction": d.instruction, "input": d.input, "output": d.output} for d in shown]
            examples.append({**alone, "id": f"seed-{n}-k{len(demos)}", "demos": demos})
    return examples


def _training_examples(
    responses: list[dict[str, Any]], passages: dict[str, list[str]], seed_set: SeedSet, config: RunConfig, folder: Path
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The usable synthetic examples (``config.response_filters`` applied, counted per filter), then the seeds if asked.

    ``passages`` holds, per response id, the documents its prompts showed.

    Writes what training will see to ``training_set.jsonl`` (each example with
    its ``source``) and the removed responses with the filter and reason to
    ``rejected_responses.jsonl``: the run folder shows exactly what the adapter
    learned from, not only the raw generations.
    """
    from carve.specialize.filters import RESPONSE_FILTERS, degenerate_response

    removed = {name: 0 for name in RESPONSE_FILTERS}
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for response in responses:
        verdict = degenerate_response(response["output"], response["instruction"], response["input"], passages.get(response["id"], ()), checks=config.response_filters)
        example = {"id": response["id"], "source": "synthetic", "instruction": response["instruction"], "input": response["input"], "output": response["output"]}
        if verdict is None:
            kept.append(example)
        else:
            removed[verdict[0]] += 1
            rejected.append({**example, "filter": verdict[0], "reason": verdict[1]})
    if config.train_on_seeds:
        kept += seed_examples(seed_set, config.seed_demonstrations)
    write_jsonl_atomic(folder / TRAINING_SET, kept)
    write_jsonl_atomic(folder / REJECTED_RESPONSES, rejected)
    return kept, removed


def _training_counts(trained: "TrainResult") -> dict[str, Any]:
    return {
        "examples": trained.examples, "skipped_too_long": trained.skipped_too_long, "steps": trained.steps,
        "final_loss": trained.final_loss, "first_loss": trained.losses[0] if trained.losses else None,
        "examples_per_second": trained.examples_per_second,
    }


def _train_seed_adapter(inputs: Inputs, manifest: Manifest) -> Path:
    """Stage 0: a LoRA on the seeds alone; it writes the responses (``respond_with``) and/or stage 4 continues from it (``train_from``).

    Why: a 135M base answers a generated task zero-shot by restating it (59 of
    120 of SmolLM2's quick responses were echoes) while the same model trained
    on the seeds already scores twice its base (issue 4). The paper's base is
    30B, where zero-shot responses are usable; here the seeds must teach the
    answer formats before the model can write answers worth learning, and
    continuing from this adapter keeps what the seeds taught instead of
    diluting 188 certain examples with 96 generated ones.
    """
    from carve.specialize.training import train_lora

    config = inputs.config
    examples = seed_examples(inputs.seed_set, config.seed_demonstrations)
    (inputs.out / SEED_ADAPTER).mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(inputs.out / SEED_ADAPTER / TRAINING_SET, examples)
    trained = manifest.timed(
        "seed_training",
        lambda: train_lora(inputs.base.path, examples, config.training, inputs.out / SEED_ADAPTER, config.seed, label="seed training (stage 0)"),
    )
    manifest.data["counts"]["seed_training"] = _training_counts(trained)
    manifest.save()
    return trained.adapter_dir


def _iteration(
    engine: Any, inputs: Inputs, manifest: Manifest, folder: Path, number: int, init_adapter: Path | None, responder: str | None = None
) -> Path:
    """Stages 1-4 of one iteration in ``folder``; returns the trained adapter folder.

    ``responder`` is the adapter that writes the responses (None: the base);
    iteration 2 passes none, as it decodes contrastively with the specialized adapter.
    """
    from carve.specialize.generate_instructions import InstructionResult, generate_instructions
    from carve.specialize.responses import generate_responses, retrieve, shown_passages
    from carve.specialize.retrieval import BM25Index
    from carve.specialize.store import read_jsonl
    from carve.specialize.training import train_lora

    config, suffix = inputs.config, "" if number == 1 else f"_iter{number}"
    folder.mkdir(parents=True, exist_ok=True)
    contrast = SPECIALIZED if number > 1 else None
    earlier = read_jsonl(inputs.out / "instructions.jsonl") if number > 1 else []
    if number > 1 and config.iteration_instructions == "same":
        made = InstructionResult(kept=earlier, counts={}, prompts=0, parsed=0, generated_tokens=0)
        manifest.data["counts"][f"instructions{suffix}"] = {"reused": len(earlier), "from": "iteration 1"}
    else:
        avoid = [r["instruction"] for r in earlier]
        made = manifest.timed(
            f"instructions{suffix}",
            lambda: generate_instructions(engine, config, inputs.seed_set, folder, number, adapter=contrast, avoid=avoid),
        )
        manifest.data["counts"][f"instructions{suffix}"] = {
            "prompts": made.prompts, "parsed": made.parsed, "kept": len(made.kept), "removed": made.counts, "generated_tokens": made.generated_tokens,
        }
    hits = None
    if config.retrieval != "none":
        assert inputs.corpus is not None
        corpus = inputs.corpus

        def run_retrieval() -> Any:
            index = BM25Index.open(corpus, inputs.out.parent / ".carve-bm25")
            return retrieve(index, corpus, made.kept, config.top_k, folder)

        hits = manifest.timed(f"retrieval{suffix}", run_retrieval)
        manifest.data["counts"][f"retrieval{suffix}"] = {"queries": len(hits)}
    responses = manifest.timed(
        f"responses{suffix}",
        lambda: generate_responses(
            engine, config, inputs.seed_set.domain, made.kept, hits, inputs.corpus, folder, contrast, f"responses (iteration {number})",
            adapter=responder,
        ),
    )
    ordered = [responses.items[item["id"]] for item in made.kept]
    documents = inputs.corpus.by_id() if inputs.corpus is not None else {}
    passages = {r["id"]: shown_passages(config, hits.items.get(r["id"]) if hits is not None else None, documents, contrast is not None) for r in ordered}
    examples, removed = _training_examples(ordered, passages, inputs.seed_set, config, folder)
    manifest.data["counts"][f"responses{suffix}"] = {
        "generated": len(ordered), "removed": removed, "kept": len(ordered) - sum(removed.values()),
        "seed_examples": sum(e["source"] == "seed" for e in examples), "generated_tokens": sum(r["tokens"] for r in ordered),
    }
    manifest.save()
    if not examples:
        if init_adapter is None:
            raise RunError(f"every generated response of iteration {number} was filtered out and no seeds train: nothing to train on ({folder / REJECTED_RESPONSES})")
        manifest.data["counts"][f"training{suffix}"] = {"examples": 0, "kept_adapter": str(init_adapter)}
        manifest.save()
        return init_adapter
    trained = manifest.timed(
        f"training{suffix}",
        lambda: train_lora(inputs.base.path, examples, config.training, folder / "train", config.seed + number - 1, init_adapter, label=f"training (iteration {number})"),
    )
    manifest.data["counts"][f"training{suffix}"] = _training_counts(trained)
    manifest.save()
    return trained.adapter_dir


def _grounded_iteration(engine: Any, inputs: Inputs, manifest: Manifest, init_adapter: Path | None, responder: str | None) -> Path:
    """Stages 1-4 with corpus sentences as the task inputs (carve.specialize.grounded); returns the trained adapter folder."""
    from carve.specialize.grounded import grounded_instances, training_examples
    from carve.specialize.training import train_lora

    config, corpus = inputs.config, inputs.corpus
    assert corpus is not None  # prepare() refuses corpus instances without one
    made = manifest.timed(
        "corpus_instances",
        lambda: grounded_instances(engine, config, inputs.seed_set, corpus, inputs.out, inputs.out.parent / ".carve-bm25", responder),
    )
    examples = training_examples(made.kept, config.seed_demonstrations > 0)
    if config.train_on_seeds:
        examples += seed_examples(inputs.seed_set, config.seed_demonstrations)
    write_jsonl_atomic(inputs.out / TRAINING_SET, examples)
    manifest.data["counts"]["corpus_instances"] = {
        "instances": made.instances, "kept": len(made.kept), "removed": made.counts, "kept_per_task": made.per_task,
        "skipped_tasks": made.skipped_tasks, "generated_tokens": made.generated_tokens, "training_examples": len(examples),
    }
    manifest.save()
    if not examples:
        if init_adapter is None:
            raise RunError(f"no corpus instance passed the filters and no seeds train: nothing to train on ({inputs.out})")
        manifest.data["counts"]["training"] = {"examples": 0, "kept_adapter": str(init_adapter)}
        manifest.save()
        return init_adapter
    trained = manifest.timed(
        "training", lambda: train_lora(inputs.base.path, examples, config.training, inputs.out / "train", config.seed, init_adapter, label="training (corpus instances)")
    )
    manifest.data["counts"]["training"] = _training_counts(trained)
    manifest.save()
    return trained.adapter_dir


def run_specialization(inputs: Inputs, eval_tasks: Path | None = None, eval_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; returns the manifest data. Call :func:`prepare` first."""
    from carve.engine.loading import open_engine
    from carve.specialize.package import carve_version, now_iso, package_adapter

    inputs.out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(inputs)
    config = inputs.config
    engine, _resolved, plan = manifest.timed("load_model", lambda: open_engine(str(inputs.base.path)))
    manifest.data["load_plan"] = plan.describe()

    seed_adapter = _train_seed_adapter(inputs, manifest) if runs_seed_stage(config, eval_tasks is not None) else None
    responder = None
    if seed_adapter is not None and config.respond_with == "seed_adapter":
        engine.load_adapter(SEEDED, seed_adapter)
        responder = SEEDED
    start_from = seed_adapter if config.train_from == "seed_adapter" else None
    if config.instances == "corpus":
        trained = _grounded_iteration(engine, inputs, manifest, start_from, responder)
    else:
        trained = _iteration(engine, inputs, manifest, inputs.out, 1, start_from, responder)
    if config.iterations == 2:
        if SPECIALIZED in engine.adapters:
            engine.unload_adapter(SPECIALIZED)
        engine.load_adapter(SPECIALIZED, trained)
        trained = _iteration(engine, inputs, manifest, inputs.out / ITERATION_2, 2, trained)

    evaluation = None
    if eval_tasks is not None:
        assert seed_adapter is not None  # runs_seed_stage: evaluating needs the seeds-only adapter to compare with
        evaluation = manifest.timed("evaluation", lambda: _evaluate(engine, seed_adapter, trained, inputs, eval_tasks, eval_options or {}))
        manifest.data["evaluation"] = evaluation
        if evaluation["choice"]["chosen"] == SEEDS_ONLY:
            trained = seed_adapter

    domain = inputs.seed_set.domain
    card = AdapterCard(
        name=domain.tag,
        base_model=inputs.base.name,
        base_model_id=inputs.base.model_id,
        base_fingerprint=inputs.base.fingerprint,
        domain=CardDomain(name=domain.name, tag=domain.tag, description=domain.description),
        seeds_hash=inputs.seed_set.content_hash,
        seeds_count=len(inputs.seed_set.seeds),
        corpus_hash=inputs.corpus.content_hash if inputs.corpus else None,
        counts=manifest.data["counts"],
        hyperparameters=config.model_dump(mode="json"),
        timings_s=manifest.data["timings_s"],
        evaluation=evaluation,
        created_at=now_iso(),
        carve_version=carve_version(),
        run_id=inputs.out.name,
    )
    manifest.timed("package", lambda: package_adapter(trained, inputs.out / ADAPTER, card))
    from carve.specialize.generate_instructions import INSTRUCTIONS
    from carve.specialize.package import write_profile

    write_profile(inputs.out / ADAPTER, inputs.seed_set.seeds, [inputs.out / INSTRUCTIONS, inputs.out / ITERATION_2 / INSTRUCTIONS])
    manifest.data["adapter"] = str(inputs.out / ADAPTER)
    manifest.data["finished_at"] = now_iso()
    manifest.save()
    return manifest.data


def recorded_choice(run_dir: Path) -> dict[str, Any] | None:
    """The evaluation's choice of adapter a finished run recorded in its manifest, if it evaluated."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    evaluation = json.loads(path.read_text()).get("evaluation") or {}
    return evaluation.get("choice")


def runs_seed_stage(config: RunConfig, evaluating: bool) -> bool:
    """Stage 0 runs when the profile uses the seed adapter, and whenever the run evaluates: it is what the result must beat."""
    return config.uses_seed_adapter() or evaluating


def _evaluate(engine: Any, seed_adapter: Path, trained: Path, inputs: Inputs, tasks: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Base, the seeds-only adapter and the self-specialized one on the given tasks (carve.evaluation.run), and the choice between the two."""
    from carve.evaluation.run import evaluate_models

    for label, folder in ((SEEDS_ONLY, seed_adapter), (SELF_SPECIALIZED, trained)):
        if label not in engine.adapters:
            engine.load_adapter(label, folder)
    report = evaluate_models(
        engine,
        models={"base": None, SEEDS_ONLY: SEEDS_ONLY, SELF_SPECIALIZED: SELF_SPECIALIZED},
        tasks_dir=tasks,
        shots=tuple(options.get("shots") or (0,)),
        demos=inputs.seed_set,
        limit=options.get("limit"),
        out_dir=inputs.out / "evaluation",
        against=[SEEDS_ONLY],
    )
    return {
        "tasks_dir": str(tasks),
        "shots": report.shots,
        "limit": report.limit,
        "choice": choose_adapter(report),
        "macro": [score.model_dump(mode="json") for score in report.macro],
        "gains": [gain.model_dump(mode="json") for gain in report.gains],
        "scores": [score.model_dump(mode="json") for score in report.scores],
        "details": str(inputs.out / "evaluation"),
    }


def choose_adapter(report: Any) -> dict[str, Any]:
    """The adapter a team receives: the self-specialized one unless the seeds-only adapter scored higher.

    The measure is macro token F1, averaged over the evaluated k: a team never
    receives an adapter that measured worse than training on its own seeds.
    """
    def mean_f1(label: str) -> float:
        values = [s.f1 for s in report.macro if s.model == label]
        return round(sum(values) / len(values), 4)

    scores = {label: mean_f1(label) for label in ("base", SEEDS_ONLY, SELF_SPECIALIZED)}
    chosen = SELF_SPECIALIZED if scores[SELF_SPECIALIZED] >= scores[SEEDS_ONLY] else SEEDS_ONLY
    paired = [report.gain(SELF_SPECIALIZED, SEEDS_ONLY, k) for k in report.shots]
    shown = "; ".join(f"k={g.k} {g.gain:+.2f} [{g.low:+.2f}, {g.high:+.2f}]" for g in paired if g is not None)
    verdict = "at least as high as" if chosen == SELF_SPECIALIZED else "below"
    reason = (
        f"macro token F1 over k={','.join(map(str, report.shots))}: self-specialized {scores[SELF_SPECIALIZED]:.2f}, "
        f"{verdict} seeds-only {scores[SEEDS_ONLY]:.2f} (base {scores['base']:.2f}); paired gain over seeds-only {shown}"
    )
    gains = [{"k": g.k, "gain": g.gain, "interval_95": [g.low, g.high]} for g in paired if g is not None]
    return {"chosen": chosen, "macro_f1": scores, "gain_over_seeds_only": gains, "reason": reason}
