"""The settings of one self-specialization run, and the two named profiles.

``paper`` is the paper's appendix B (5K examples, k=5, LoRA r=8/alpha=16,
lr 3e-4, batch 32, 3 epochs). ``quick`` is sized for a 2-core CPU and
SmolLM2-135M (about 55 tokens/s at a batch of 16 with two threads on a quiet
machine, 1.2 s per training example): 120 kept pairs, each the first new item
of one prompt's list continuation (``first_item_only``: in the SmolLM2 run
that generated whole 192-token continuations, 56 of the 60 kept pairs were a
prompt's first item and the rest of the tokens looped on it), k=3 documents
clipped to 80 words, 48-token responses, one epoch at max length 512 with an
effective batch of 8 (so that enough optimizer steps happen at all) at lr 1e-3
(3e-4 barely moved the loss in those few steps).

Where quick departs from the paper, and why (measured in issue 4): a 135M
generator sampling at T=1.0/top-p 0.98 writes mostly word salad, so quick
samples at T=0.7/top-p 0.9 and rejects pairs less fluent to the base model
than every seed (``fluency_margin`` 0); and the seeds, the only data that is
certainly right, train first, alone (stage 0, each seed also after 2
demonstrations); that adapter writes the responses (``respond_with``) and
stage 4 continues it on the kept generated pairs (``train_from``) at the
paper's 3e-4 (``continue_learning_rate``). With the zero-shot base writing
them, 59 of 120 responses restated their task and the generated data cost 4-6
points against training on the seeds alone; written by the seed adapter 96 of
120 pass the filters. Continued at 1e-3, the adapter drifted into the generated
pairs' formats (gemma3-270m answered classification tasks as entity lists);
at 3e-4 it keeps what the seeds taught (docs/results, eval-*-contlr-limit40).
``train_on_seeds`` (the seeds mixed into the generated examples instead) was
the earlier way. The measured stage times of a run are in its run.json.
A run folder records its config; resuming under a different one is refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carve.engine.models import DEFAULT_MODEL

Profile = Literal["quick", "paper"]
RetrievalMode = Literal["marginal", "top1", "none"]
ResponseFilter = Literal["empty", "repetitive", "echo", "copied", "markup"]


class TrainingConfig(BaseModel):
    """LoRA specialization (paper appendix B); ``batch_size`` is the effective batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = "all-linear"
    learning_rate: float = Field(3e-4, gt=0)
    continue_learning_rate: float | None = Field(
        None, gt=0, description="learning rate when training continues an adapter (stage 4 from the seed adapter, iteration 2); None: learning_rate"
    )
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    max_length: int = Field(1024, ge=16)
    save_every_steps: int = Field(0, ge=0, description="also checkpoint every N optimizer steps (0: each epoch only)")

    @model_validator(mode="after")
    def _divides(self) -> "TrainingConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}")
        return self

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size

    def rate(self, continuing: bool) -> float:
        """The learning rate of a fresh LoRA, or of one that continues an adapter."""
        if continuing and self.continue_learning_rate is not None:
            return self.continue_learning_rate
        return self.learning_rate


class RunConfig(BaseModel):
    """Everything that decides a run's outputs (paths of inputs are recorded by hash in run.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Profile = "paper"
    base: str = DEFAULT_MODEL
    seed: int = 0
    num_instructions: int = Field(5000, ge=1)
    iterations: Literal[1, 2] = 1
    iteration_instructions: Literal["fresh", "same"] = Field(
        "fresh", description="iteration 2's instructions: a fresh set, distinct from iteration 1's (the paper), or iteration 1's again"
    )
    instances: Literal["generated", "corpus"] = Field(
        "generated", description="where stage 1's task inputs come from: the model's own list continuations (the paper) or corpus sentences (carve.specialize.grounded)"
    )
    corpus_per_task: int = Field(12, ge=1, description="instances: corpus: inputs selected per sentence-input seed task")
    corpus_shots: int = Field(2, ge=1, description="instances: corpus: seeds shown before each input, in each of the two views whose answers must agree")
    # instruction generation (Table 3, appendix B)
    prompt_style: Literal["raw", "chat"] = "chat"
    seeds_per_prompt: int = Field(3, ge=1)
    instruction_batch: int = Field(8, ge=1)
    instruction_max_new_tokens: int = Field(1024, ge=8)
    first_item_only: bool = Field(
        False, description="stop each list continuation after its first new item (a small model's later items are mostly loops of it)"
    )
    instruction_temperature: float = 1.0
    instruction_top_p: float = 0.98
    seed_input_chars: int | None = None
    require_input: bool = Field(True, description="reject items without an input line (the paper forces an input)")
    max_prompts: int | None = Field(None, description="stop generating after this many prompts even if short of num_instructions")
    # filters
    min_instruction_words: int = 3
    max_instruction_words: int = 150
    max_input_chars: int = 2000
    rouge_threshold: float = 0.7
    fluency_margin: float | None = Field(
        None, description="reject pairs whose mean NLL under the base exceeds the least fluent seed's by more than this (None: off, as in the paper)"
    )
    # retrieval and responses (eq. 1-2)
    retrieval: RetrievalMode = "marginal"
    top_k: int = Field(5, ge=1)
    document_words: int | None = None
    response_batch: int = Field(8, ge=1)
    response_max_new_tokens: int = Field(512, ge=1)
    contrast_alpha: float = Field(0.1, ge=0, le=1)
    respond_with: Literal["base", "seed_adapter"] = Field(
        "base", description="who writes stage 3's responses: the base (the paper) or an adapter first trained on the seeds alone (stage 0)"
    )
    response_filters: tuple[ResponseFilter, ...] = Field(
        ("empty",), description="response filters applied before training (carve.specialize.filters.degenerate_response); the paper has none but empty"
    )
    # training data (stage 4)
    train_on_seeds: bool = Field(False, description="add the seed examples to the synthetic ones (the paper trains on synthetic data only)")
    seed_demonstrations: int = Field(
        0, ge=0, description="also train on each seed after this many other seeds of its task, as a k-shot prompt shows them (0: zero-shot only)"
    )
    train_from: Literal["scratch", "seed_adapter"] = Field(
        "scratch", description="where stage 4 starts: a fresh LoRA (the paper) or the stage-0 adapter trained on the seeds"
    )
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _demonstrations_need_seeds(self) -> "RunConfig":
        if self.seed_demonstrations and not (self.train_on_seeds or self.uses_seed_adapter()):
            raise ValueError("seed_demonstrations needs train_on_seeds or a seed adapter: the demonstrated examples are seeds")
        return self

    @model_validator(mode="after")
    def _corpus_instances_once(self) -> "RunConfig":
        if self.instances == "corpus" and self.iterations != 1:
            raise ValueError("instances 'corpus' runs one iteration: iteration 2 generates a fresh instruction set, which corpus instances do not have")
        return self

    def uses_seed_adapter(self) -> bool:
        """Whether stage 0 (a LoRA on the seeds alone) runs: it writes the responses, or stage 4 continues from it."""
        return self.respond_with == "seed_adapter" or self.train_from == "seed_adapter"

    def branches(self) -> int:
        """Documents per response: k for marginalization, 1 for top-1, 0 without retrieval."""
        return {"marginal": self.top_k, "top1": 1, "none": 0}[self.retrieval]

    def max_prompt_count(self) -> int:
        # a prompt yields several pairs; stop at 4x num_instructions prompts if filters keep rejecting
        return self.max_prompts if self.max_prompts is not None else 4 * self.num_instructions


PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "num_instructions": 120,
        "first_item_only": True,
        "require_input": False,
        "instruction_temperature": 0.7,
        "instruction_top_p": 0.9,
        "fluency_margin": 0.0,
        "seed_demonstrations": 2,
        "respond_with": "seed_adapter",
        "train_from": "seed_adapter",
        "response_filters": ("empty", "repetitive", "echo", "copied", "markup"),
        "instruction_batch": 16,
        "instruction_max_new_tokens": 160,
        "seed_input_chars": 150,
        "max_prompts": 320,
        "top_k": 3,
        "document_words": 80,
        "response_batch": 8,
        "response_max_new_tokens": 48,
        "max_input_chars": 600,
        "training": {"epochs": 1, "learning_rate": 1e-3, "continue_learning_rate": 3e-4, "batch_size": 8, "micro_batch_size": 4, "max_length": 512, "save_every_steps": 4},
    },
}


def build_config(profile: Profile = "paper", **overrides: Any) -> RunConfig:
    """A profile's settings with the given overrides (None values are ignored)."""
    values: dict[str, Any] = {**PROFILES[profile], "profile": profile}
    training = dict(values.pop("training", {}))
    training.update(overrides.pop("training", None) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**values, training=TrainingConfig(**training))
