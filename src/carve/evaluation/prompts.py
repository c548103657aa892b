"""k-shot evaluation prompts that fit the model's context window.

A prompt is k demonstrations (complete Alpaca examples, separated by blank
lines) followed by the query's Alpaca prompt; the template is the one training
uses (carve.engine.templates). Demonstrations are the first k seeds of the
query's task, topped up with the domain's other seeds when the task has fewer.

Long inputs (PubMedQA abstracts) must still leave room for the answer, so a
prompt that does not fit loses its demonstrations first, last one first, and
only then has the query's input cut from its end. The instruction is never cut:
an example whose instruction alone does not fit is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from carve.engine.templates import RESPONSE_MARKER, STOP_STRINGS, Example, alpaca_prompt, kshot_prompt


class PromptError(ValueError):
    """An example that cannot be turned into a prompt within the context window."""


class Demo(Example, Protocol):
    """A demonstration with its task (picked by task): carve.specialize.seeds.Seed satisfies it."""

    task: str | None


class DemoSet(Protocol):
    """Where the demonstrations come from: carve.specialize.seeds.SeedSet satisfies it."""

    path: Path
    domain: Any  # with a ``name``

    @property
    def seeds(self) -> Sequence[Demo]: ...


class Query(Protocol):
    id: str
    task: str
    instruction: str
    input: str


@dataclass(frozen=True)
class BuiltPrompt:
    text: str
    shots_used: int
    input_trimmed: bool
    prompt_tokens: int


def eval_stop_strings() -> tuple[str, ...]:
    """The training stop strings, the start of the next demonstration, and any new '### ' section.

    After answering a k-shot prompt a model tends to begin the next example
    ("Below is an instruction ..."), or a section of its own ("### Explanation:");
    both are taken from the template itself, not written out again.
    """
    preamble = os.path.commonprefix([alpaca_prompt("x"), alpaca_prompt("x", "y")]).strip()
    section = RESPONSE_MARKER.split(" ")[0] + " "  # "### "
    # Only the preamble's first word: a stop string must be complete to stop, and yes/no
    # tasks have a budget of a few tokens ("no\n\nBelow is an instruction" would run out first).
    return tuple(STOP_STRINGS) + ("\n\n" + preamble.split()[0], "\n" + section)


def _same_question(demo: Demo, query: Query | Demo) -> bool:
    def norm(text: str) -> str:
        return " ".join(text.split()).lower()

    return norm(demo.instruction) == norm(query.instruction) and norm(demo.input) == norm(query.input)


def pick_demos(seeds: Sequence[Demo], query: Query | Demo, k: int) -> list[Demo]:
    """The first k seeds of the query's task, then the domain's other seeds in order.

    A seed that is the query itself (same instruction and input) is skipped, so
    the answer is never shown in the prompt; a seed may be the query (training
    on demonstrations, carve.specialize.run.seed_examples).
    """
    if k <= 0:
        return []
    same = [s for s in seeds if s.task == query.task]
    others = [s for s in seeds if s.task != query.task]
    return [s for s in same + others if not _same_question(s, query)][:k]


@dataclass(frozen=True)
class PromptFitter:
    """Builds prompts that take at most ``budget`` tokens.

    ``count`` is the token count of a full prompt as the engine encodes it;
    ``encode``/``decode`` tokenise plain text so an input is cut at a token boundary.
    """

    budget: int
    count: Callable[[str], int]
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]

    def build(self, query: Query, demos: Sequence[Demo]) -> BuiltPrompt:
        demos = list(demos)
        while True:
            text = kshot_prompt(demos, query.instruction, query.input)
            tokens = self.count(text)
            if tokens <= self.budget:
                return BuiltPrompt(text, len(demos), False, tokens)
            if not demos:
                break
            demos.pop()  # the last demonstration goes first
        return self._trim_input(query, text, tokens)

    def _trim_input(self, query: Query, text: str, tokens: int) -> BuiltPrompt:
        input_ids = self.encode(query.input)
        keep = len(input_ids)
        while tokens > self.budget:
            if keep == 0:
                raise PromptError(
                    f"task {query.task!r} example {query.id!r}: the instruction alone takes {tokens} tokens, "
                    f"more than the {self.budget} the context leaves for the prompt"
                )
            # Cut by the overshoot (plus one, as token boundaries can shift), then re-check.
            keep = max(0, keep - (tokens - self.budget) - 1)
            cut = self.decode(input_ids[:keep]).rstrip("\ufffd")
            text = kshot_prompt([], query.instruction, cut)
            tokens = self.count(text)
        return BuiltPrompt(text, 0, True, tokens)
