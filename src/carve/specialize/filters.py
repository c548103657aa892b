"""Self-instruct filters for generated (instruction, input) pairs, each counting what it removed.

A pair is checked in this order and rejected by the first filter it fails:
``malformed`` (the parser could not read it), ``length`` (instruction of too
few or too many words, input too long), ``not_text`` (asks for images, files,
audio..., which a text model cannot give), ``near_duplicate`` (ROUGE-L F >= 0.7
with an instruction already kept, seeds included), ``disfluent`` (less likely
under the base model than every seed by a margin: see carve.specialize.fluency;
only when a scorer is given; last, as the one check that runs the model). Responses get their own check,
:func:`degenerate_response` (empty, looping on the same phrase, a restatement
of its own instruction or input, or a passage copied from a retrieved document). ROUGE-L follows
rouge-score's tokenisation (lower-cased alphanumeric words, Porter stemming
off) with a longest-common-subsequence computed here, skipped when the two
lengths alone rule out the threshold: the paper profile compares 5 000
instructions against each other.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

FILTERS = ("malformed", "length", "not_text", "near_duplicate", "disfluent")
RESPONSE_FILTERS = ("empty", "repetitive", "echo", "copied", "markup")
# A closing tag, or a TeX/math tag: the seeds mark an entity with one opening-style "<Type>" and close nothing.
_MARKUP = re.compile(r"</[A-Za-z][\w-]*>|<(?:tex|math|latex)\b[^>]*>", re.IGNORECASE)

# self-instruct's list of things a text-only model cannot do
NOT_TEXT_WORDS = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)
_NOT_TEXT = re.compile(r"\b(" + "|".join(re.escape(w) for w in NOT_TEXT_WORDS) + r")\b", re.IGNORECASE)
_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation: lower case, runs of [a-z0-9]."""
    return _TOKEN.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists (same value as rouge-score's rougeL fmeasure)."""
    if not a or not b:
        return 0.0
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(b), lcs / len(a)
    return 2 * precision * recall / (precision + recall)


@dataclass
class DuplicateIndex:
    """Instructions kept so far, for the ROUGE-L near-duplicate check."""

    threshold: float = 0.7
    entries: list[tuple[list[str], Counter[str]]] = field(default_factory=list)

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        self.entries.append((tokens, Counter(tokens)))

    def most_similar(self, text: str) -> tuple[float, int]:
        """(best ROUGE-L >= threshold or 0.0, index of that entry or -1)."""
        tokens = rouge_tokens(text)
        if not tokens:
            return 0.0, -1
        counts = Counter(tokens)
        n = len(tokens)
        for index, (other, other_counts) in enumerate(self.entries):
            m = len(other)
            if not m or 2 * min(n, m) / (n + m) < self.threshold:  # F <= 2 min/(n+m), even if one contains the other
                continue
            overlap = sum((counts & other_counts).values())  # LCS <= bag overlap
            if 2 * overlap / (n + m) < self.threshold:
                continue
            score = rouge_l(tokens, other)
            if score >= self.threshold:
                return score, index
        return 0.0, -1


@dataclass(frozen=True)
class FilterSettings:
    min_instruction_words: int = 3
    max_instruction_words: int = 150
    max_input_chars: int = 2000
    rouge_threshold: float = 0.7


def check_pair(instruction: str, input: str, settings: FilterSettings) -> tuple[str, str] | None:
    """The first content filter the pair fails, as (filter, reason); None when it passes."""
    words = len(instruction.split())
    if words < settings.min_instruction_words:
        return "length", f"instruction has {words} words (< {settings.min_instruction_words})"
    if words > settings.max_instruction_words:
        return "length", f"instruction has {words} words (> {settings.max_instruction_words})"
    if len(input) > settings.max_input_chars:
        return "length", f"input has {len(input)} characters (> {settings.max_input_chars})"
    match = _NOT_TEXT.search(instruction)
    if match:
        return "not_text", f"asks for {match.group(1).lower()!r}, which a text model cannot handle"
    if instruction[0] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
        return "malformed", "instruction starts with punctuation"
    if not instruction[0].isascii():
        return "malformed", "instruction does not start with an English letter or digit"
    return None


def empty_counts() -> dict[str, int]:
    return {name: 0 for name in FILTERS}


def seed_index(instructions: Iterable[str], threshold: float) -> DuplicateIndex:
    index = DuplicateIndex(threshold)
    for text in instructions:
        index.add(text)
    return index


def degenerate_response(
    text: str,
    instruction: str = "",
    input: str = "",
    documents: Sequence[str] = (),
    n: int = 4,
    min_distinct: float = 0.5,
    echo_threshold: float = 0.7,
    copy_words: int = 12,
    copy_share: float = 0.8,
    checks: Sequence[str] = RESPONSE_FILTERS,
) -> tuple[str, str] | None:
    """Why a response is unfit for training, as (filter, reason); None when it is usable.

    ``repetitive``: fewer than ``min_distinct`` of its word n-grams are distinct
    (a small model stuck in a loop: "The correct answer is: The correct answer is: ...").
    Lists of different entities sharing a type tag stay distinct, so they pass.
    ``echo``: ROUGE-L >= ``echo_threshold`` with its own instruction or input: the
    model restated the task instead of doing it, and training on that teaches
    the adapter to copy (SmolLM2's quick run: "The gene X has been identified."
    answered by the same sentence). An extracted span is far shorter than the
    text it comes from, so extraction answers stay below the threshold.
    ``copied``: at least ``copy_words`` words, ``copy_share`` of them a
    subsequence of one document the prompt showed: the model read the passage
    out instead of answering ("Split the sentence..." answered by the first
    lines of the retrieved abstract). A short extracted answer is not long
    enough to count. ``markup``: a closing tag or a TeX tag, which no seed answer
    has (gemma3-270m's seed adapter wrote "HPV 16 <tex>$16$</tex>" for 35 of 120
    responses, and the adapter trained on them appended it to its answers).
    Only the filters named in ``checks`` apply.
    """
    tokens = rouge_tokens(text)
    if "empty" in checks and not text.strip():
        return "empty", "empty response"
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if "repetitive" in checks and len(grams) >= 2 * n:
        distinct = len(set(grams)) / len(grams)
        if distinct < min_distinct:
            return "repetitive", f"only {distinct:.0%} of its {n}-word phrases are distinct"
    for name, source in (("instruction", instruction), ("input", input)) if "echo" in checks else ():
        score = rouge_l(tokens, rouge_tokens(source))
        if score >= echo_threshold:
            return "echo", f"ROUGE-L {score:.2f} with its own {name}"
    if "markup" in checks:
        match = _MARKUP.search(text)
        if match:
            return "markup", f"markup no seed answer has: {match.group(0)!r}"
    if "copied" in checks and len(tokens) >= copy_words:
        for number, document in enumerate(documents, start=1):
            share = _lcs(tokens, rouge_tokens(document)) / len(tokens)
            if share >= copy_share:
                return "copied", f"{share:.0%} of its words copied in order from retrieved document {number}"
    return None
