"""The paper's Table 3 prompts and the parser that reads the continued task list back.

Instruction generation shows the model the Table 3 prompt followed by three
seeds as items 1-3 of a numbered list and lets it continue from item 4. Each
item is written on two lines, ``N. Instruction: ...`` and ``N. Input: ...``
(``<noinput>`` when empty), a format that small instruct models continue
reliably and that :func:`parse_task_list` reads back. The prompt ends with
``4. Instruction:`` so the first generated item cannot drift off-format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from carve.engine.text import format_user_prompt, has_chat_template
from carve.specialize.seeds import Domain, Seed

PromptStyle = Literal["raw", "chat"]
NO_INPUT = "<noinput>"
FIRST_GENERATED = 4  # items 1-3 are the seeds shown
NO_INPUT_LINE = "no input line"
NEXT_ITEM = ". Instruction:"  # the stop string that ends a continuation after its first item ("5. Instruction:")

INSTRUCTION_PROMPT = """You are asked to come up with a set of 20 diverse task instructions about a {domain} domain. These task instructions will be given to a GPT model and we will evaluate the GPT model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instruction also should be diverse. For example, you should combine questions with imperative instructions.
3. The type of instructions should be diverse. The list should include diverse types of tasks like open-ended generation, classification, editing, etc.
4. A GPT language model should be able to complete the instruction. For example, do not ask the assistant to create any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set a reminder because it cannot perform any action.
5. The instructions should be in English.
6. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is permitted.
7. You should generate an appropriate input to the instruction. The input field should contain a specific example provided for the instruction. It should involve realistic data and should not contain simple placeholders. The input should provide substantial content to make the instruction challenging.
8. Ensure diverse tasks are covered in the instructions and inputs, while focusing on a {domain} domain.

List of 20 tasks:"""

RESPONSE_PROMPT = (
    "You are a {domain} domain expert. Given an instruction and an input, "
    "generate the best response to solve the given {domain} task."
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


def format_item(number: int, instruction: str, input: str, max_input_chars: int | None = None) -> str:
    """One list item on two lines; newlines inside fields are flattened so the list stays parseable."""
    shown_input = _one_line(_clip(input, max_input_chars)) if input.strip() else NO_INPUT
    return f"{number}. Instruction: {_one_line(instruction)}\n{number}. Input: {shown_input}\n"


def _wrap(tokenizer: Any, user: str, assistant_prefix: str, style: PromptStyle) -> str:
    """Raw text, or the user turn in the chat template with the assistant's reply pre-filled."""
    if style == "chat" and has_chat_template(tokenizer):
        return format_user_prompt(tokenizer, user) + assistant_prefix
    return user + "\n" + assistant_prefix


def instruction_prompt(domain: Domain, seeds: Sequence[Seed], tokenizer: Any = None, style: PromptStyle = "raw", max_input_chars: int | None = None) -> str:
    """Table 3 instruction prompt + the seeds as items 1..n, ending at ``<n+1>. Instruction:``.

    In ``chat`` style the requirements are the user turn and the list is the
    start of the assistant's answer, which the model goes on writing.
    """
    items = "".join(format_item(i, s.instruction, s.input, max_input_chars) for i, s in enumerate(seeds, start=1))
    return _wrap(tokenizer, INSTRUCTION_PROMPT.format(domain=domain.name), items + f"{len(seeds) + 1}. Instruction:", style)


def response_prompt(domain: Domain, instruction: str, input: str, document: str | None = None, tokenizer: Any = None, style: PromptStyle = "raw") -> str:
    """Table 3 response prompt, the retrieved document (if any), then the task; no demonstrations."""
    parts = [RESPONSE_PROMPT.format(domain=domain.name)]
    if document:
        parts.append(f"Document: {document.strip()}")
    parts.append(f"Instruction: {instruction.strip()}")
    if input.strip():
        parts.append(f"Input: {input.strip()}")
    user = "\n\n".join(parts)
    if style == "chat" and has_chat_template(tokenizer):
        return _wrap(tokenizer, user, "", style)
    return user + "\n\nResponse:"


@dataclass(frozen=True)
class ParsedItem:
    """One generated (instruction, input) pair, or why it could not be read."""

    number: int
    instruction: str
    input: str
    problem: str | None = None  # set when the item is malformed


_NUMBERED = re.compile(r"^\s*\d+\s*[.)]\s")
_LINE = re.compile(r"^\s*(\d+)\s*[.)]\s*(Instruction|Input|Output)\s*:\s?(.*)$", re.IGNORECASE)


def parse_task_list(completion: str, first_number: int = FIRST_GENERATED, truncated: bool = False) -> list[ParsedItem]:
    """Read the continued list: ``completion`` is the text generated after ``<first_number>. Instruction:``.

    Returns every item in order, malformed ones included with ``problem`` set
    (no input line, an input without its instruction, empty instruction).
    An input line belongs to the instruction just before it whatever its number. When the
    generation hit its token limit (``truncated``) the last item is cut short
    and is reported as malformed. Text after the list ends is ignored, and so
    is a bare item number on the last line: what a stop at :data:`NEXT_ITEM`
    leaves of the next item.
    """
    text = f"{first_number}. Instruction:" + completion
    head, _, last = text.rpartition("\n")
    if head and last.strip().isdigit():
        text = head
    items: list[ParsedItem] = []
    current: dict[str, Any] | None = None

    def close(problem: str | None = None) -> None:
        nonlocal current
        if current is None:
            return
        instruction = current["instruction"].strip()
        input_text = current["input"]
        why = problem
        if why is None and not instruction:
            why = "empty instruction"
        if why is None and input_text is None:
            why = NO_INPUT_LINE
        shown_input = (input_text or "").strip()
        items.append(ParsedItem(current["number"], instruction, "" if shown_input == NO_INPUT else shown_input, why))
        current = None

    for line in text.split("\n"):
        match = _LINE.match(line)
        if match is None and _NUMBERED.match(line):
            close()
            break  # a numbered line of another kind ("5. Rule-based: ..."): the model left the format
        if match is None:
            if current is None:
                if items and line.strip():
                    break  # prose after the list: the list has ended
                continue
            if not line.strip():
                if current["input"] is not None:
                    close()
                continue
            if current["field"] != "output":  # a continuation line of the field being written
                current[current["field"]] = (current[current["field"]] or "") + "\n" + line
            continue
        number, field, value = int(match.group(1)), match.group(2).lower(), match.group(3)
        if field == "instruction":
            close()
            current = {"number": number, "instruction": value, "input": None, "field": "instruction"}
        elif field == "input":
            # small models often misnumber ("4. Instruction" then "5. Input"): pair by position, not number
            if current is None or current["input"] is not None:
                close()
                items.append(ParsedItem(number, "", value.strip(), "input without its instruction"))
                continue
            current["input"], current["field"] = value, "input"
        elif current is not None:  # an Output line: the model wrote an answer; the item is still usable
            current["field"] = "output"
    if current is not None:
        close("cut off at the token limit" if truncated else None)
    return items
