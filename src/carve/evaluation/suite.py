"""Evaluation suites: a folder of task JSONL files, one example per line.

Each line is ``{"id", "task", "instruction", "input", "output", "answers"}``
(the format of shared/data). A suite is checked completely before anything
runs, so a bad file stops the evaluation with its file, line and field named
and nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from carve.common.errors import error_field
from carve.common.jsonl import json_object_lines


class SuiteError(ValueError):
    """An evaluation suite that cannot be used; the message names the file, line and field."""


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, AfterValidator(_non_empty)]


class EvalExample(BaseModel):
    """One evaluation example; ``answers`` are every acceptable gold string."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: Text
    task: Text
    instruction: Text
    input: str = ""
    output: Text
    answers: list[Text] = Field(min_length=1)


class TaskSuite(BaseModel):
    """The examples of one task, in file order."""

    model_config = ConfigDict(frozen=True)

    task: str
    source: str
    examples: list[EvalExample]


def _why(item: dict) -> str:
    kind = item["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return f"unknown field (allowed: {', '.join(EvalExample.model_fields)})"
    if kind == "value_error":
        return str(item.get("ctx", {}).get("error", item["msg"]))
    return str(item["msg"]).lower()


def parse_task_file(path: Path) -> list[tuple[int, EvalExample]]:
    """(line number, example) for every line of one task file; the first bad line raises SuiteError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    examples: list[tuple[int, EvalExample]] = []
    seen: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    for number, where, record in json_object_lines(text, str(path), problems):
        if problems:
            break
        try:
            example = EvalExample.model_validate(record)
        except ValidationError as exc:
            item = exc.errors()[0]
            field = error_field(item)
            raise SuiteError(f"{where}: field '{field}': {_why(item)}") from exc
        key = (example.task, example.id)
        if key in seen:
            raise SuiteError(f"{where}: field 'id': {example.id!r} repeats line {seen[key]} of task {example.task!r}")
        seen[key] = number
        examples.append((number, example))
    if problems:  # a line that is not a JSON object, before any field problem
        raise SuiteError(problems[0])
    if not examples:
        raise SuiteError(f"{path}: no examples")
    return examples


def load_suite(path: Path) -> list[TaskSuite]:
    """Load a folder of ``*.jsonl`` task files (or one file), grouped by each line's ``task``.

    Tasks come out sorted by name so reports and runs are reproducible.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise SuiteError(f"{path}: no .jsonl task files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise SuiteError(f"{path}: no such folder or file")
    by_task: dict[str, list[EvalExample]] = {}
    sources: dict[str, str] = {}
    for file in files:
        for number, example in parse_task_file(file):
            if example.task in sources and sources[example.task] != file.name:
                raise SuiteError(f"{file} line {number}: field 'task': {example.task!r} is already the task of {sources[example.task]}")
            sources[example.task] = file.name
            by_task.setdefault(example.task, []).append(example)
    return [TaskSuite(task=task, source=sources[task], examples=by_task[task]) for task in sorted(by_task)]
