"""Reading JSONL that people write: every bad line reported with where and why.

Seed sets, corpora and evaluation suites share this reader, so a bad line is
reported the same way everywhere ("seeds.jsonl line 7: invalid JSON ...").
"""

from __future__ import annotations

import json
from typing import Any, Iterator


def json_object_lines(text: str, source: str, problems: list[str]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield (line number, "SOURCE line N", object) for each non-blank line holding a JSON object.

    Lines that are not valid JSON, or hold something other than an object, are
    appended to ``problems`` and skipped, so callers can report every bad line at once.
    """
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        yield number, where, record


def count_records(text: str) -> int:
    """Non-blank lines: what the author meant as records, good or bad."""
    return sum(1 for raw in text.splitlines() if raw.strip())
