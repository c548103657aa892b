"""The Alpaca prompt template: the single source for training, evaluation and serving.

The paper trains and evaluates with the plain Alpaca template (appendix B), so
every place that formats an (instruction, input) pair for an adapter calls
:func:`alpaca_prompt`; training appends the response and the tokenizer's EOS.
A k-shot prompt (:func:`kshot_prompt`) is complete examples before the query,
the same for k-shot evaluation and for training on demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:\n"
# A response ends where the model would start the next Alpaca section.
STOP_STRINGS: tuple[str, ...] = ("\n### Instruction:", "\n### Input:", "\n### Response:", "\n\n\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt up to and including '### Response:\\n'."""
    instruction, input = instruction.strip(), input.strip()
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def alpaca_example(instruction: str, input: str, output: str) -> str:
    """A complete demonstration (prompt followed by its response), used for k-shot prompts."""
    return alpaca_prompt(instruction, input) + output.strip()


class Example(Protocol):
    """A demonstration: carve.specialize.seeds.Seed satisfies it."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Demonstration:
    """A demonstration as a training example records it (training_set.jsonl's ``demos``)."""

    instruction: str
    input: str
    output: str


def kshot_prompt(demos: Sequence[Example], instruction: str, input: str = "") -> str:
    """Demonstrations, each a full Alpaca example, then the query's prompt, separated by blank lines."""
    parts = [alpaca_example(d.instruction, d.input, d.output) for d in demos]
    parts.append(alpaca_prompt(instruction, input))
    return "\n\n".join(parts)
