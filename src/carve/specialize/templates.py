"""The Alpaca prompt template: the single source for training, evaluation and serving.

The paper trains and evaluates with the plain Alpaca template (appendix B), so
every place that formats an (instruction, input) pair for an adapter calls
:func:`alpaca_prompt`; training appends the response and the tokenizer's EOS.
"""

from __future__ import annotations

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
