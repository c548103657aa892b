"""Seed sets: the few labelled examples a domain team hands in.

A seed set is a folder with ``domain.json`` (name, tag, description)
and ``seeds.jsonl`` (one seed per line: instruction, input, output, task).
Self-specialization is only as good as its seeds, so the loader is strict and
reports *every* bad line at once (file, line, field, why) instead of stopping
at the first one: a domain team fixes its file in one pass. Loading only
reads; it never writes or normalises files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationError,
    field_validator,
)

from carve.artifact import AdapterValidationError, check_name
from carve.common.errors import error_field
from carve.common.jsonl import count_records, json_object_lines

DOMAIN_FILE = "domain.json"
SEEDS_FILE = "seeds.jsonl"
# The instruction-generation prompt shows 3 seeds drawn at random (paper §3.1).
MIN_SEEDS = 3


class SeedSetError(ValueError):
    """A seed set cannot be used; ``problems`` lists every fault found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        header = f"seed set refused ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# A string with some non-blank text; the error reads "field 'output': must not be empty".
Text = Annotated[str, AfterValidator(_non_empty)]


class Seed(BaseModel):
    """One labelled example: an instruction, an optional input, and the expected output."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    instruction: Text
    input: str = ""
    output: Text
    task: str | None = None

    @field_validator("task")
    @classmethod
    def _task_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty when given (omit it or use null)")
        return value

    def key(self) -> tuple[str, str]:
        """Two seeds with the same instruction and input are the same question."""
        return (" ".join(self.instruction.split()).lower(), " ".join(self.input.split()).lower())


class Domain(BaseModel):
    """What the seed set is about; ``name`` fills the prompts' "about a <name> domain", ``description`` is for people."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Text
    tag: str
    description: Text

    @field_validator("tag")
    @classmethod
    def _tag_is_a_name(cls, value: str) -> str:
        # The tag becomes an adapter name, a folder name and an HTTP `model` value.
        try:
            return check_name(value, "domain tag")
        except AdapterValidationError as exc:
            raise ValueError(str(exc)) from exc


class SeedSet(BaseModel):
    """A validated seed set; ``content_hash`` identifies it in run folders and adapter cards."""

    model_config = ConfigDict(frozen=True)

    domain: Domain
    seeds: list[Seed]
    path: Path

    @property
    def content_hash(self) -> str:
        """sha256 over canonical JSON of the domain and seeds: stable across formatting and paths."""
        payload = {
            "domain": self.domain.model_dump(),
            "seeds": [seed.model_dump() for seed in self.seeds],
        }
        canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def tasks(self) -> dict[str, int]:
        """Seeds per task, in first-seen order; seeds without a task count under ''."""
        counts: dict[str, int] = {}
        for seed in self.seeds:
            name = seed.task or ""
            counts[name] = counts.get(name, 0) + 1
        return counts


def _describe(where: str, error: ValidationError) -> list[str]:
    """One readable line per pydantic error: '<file> line <n>: field 'x': why'."""
    lines = []
    for item in error.errors():
        field = error_field(item)
        kind = item["type"]
        if kind == "missing":
            why = "is required"
        elif kind == "extra_forbidden":
            why = "unknown field (allowed: instruction, input, output, task)"
        elif kind in ("string_type", "string_strict_type"):
            why = f"must be a string, got {type(item.get('input')).__name__}"
        elif kind == "value_error":
            why = str(item.get("ctx", {}).get("error", item["msg"]))
        else:
            why = item["msg"]
        lines.append(f"{where}: field '{field}': {why}")
    return lines


def _parse(text: str, source: str) -> tuple[list[Seed], list[str]]:
    """Parse JSONL text, collecting every problem rather than stopping at the first."""
    seeds: list[Seed] = []
    problems: list[str] = []
    first_line: dict[tuple[str, str], int] = {}
    records = count_records(text)
    for number, where, record in json_object_lines(text, source, problems):
        try:
            seed = Seed.model_validate(record)
        except ValidationError as exc:
            problems.extend(_describe(where, exc))
            continue
        key = seed.key()
        if key in first_line:
            problems.append(
                f"{where}: field 'instruction'+'input': duplicate of line {first_line[key]} "
                "(same instruction and input)"
            )
            continue
        first_line[key] = number
        seeds.append(seed)
    # Too few seeds is its own problem only if fixing the bad lines cannot cure it.
    if records < MIN_SEEDS:
        problems.append(
            f"{source}: {records} seed{'s' if records != 1 else ''}, at least {MIN_SEEDS} are needed "
            f"(the instruction prompt shows {MIN_SEEDS} seeds drawn at random)"
        )
    return seeds, problems


def parse_seed_lines(text: str, source: str = SEEDS_FILE) -> list[Seed]:
    """Seeds from JSONL text (a file or an upload); raises SeedSetError listing every bad line."""
    seeds, problems = _parse(text, source)
    if problems:
        raise SeedSetError(problems)
    return seeds


def load_domain(path: Path) -> Domain:
    """Read and validate domain.json."""
    path = Path(path)
    source = path.name
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SeedSetError([f"{path}: missing (a seed set folder needs {DOMAIN_FILE} and {SEEDS_FILE})"]) from exc
    except UnicodeDecodeError as exc:
        raise SeedSetError([f"{source}: not UTF-8 text ({exc.reason})"]) from exc
    except json.JSONDecodeError as exc:
        raise SeedSetError([f"{source} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"]) from exc
    return parse_domain(record, source)


def parse_domain(record: object, source: str = DOMAIN_FILE) -> Domain:
    """A Domain from decoded JSON (a file or an HTTP body); raises SeedSetError naming each bad field."""
    if not isinstance(record, dict):
        raise SeedSetError([f"{source}: expected a JSON object, got {type(record).__name__}"])
    try:
        return Domain.model_validate(record)
    except ValidationError as exc:
        raise SeedSetError(_describe(source, exc)) from exc


def load_seed_set(folder_or_jsonl: Path) -> SeedSet:
    """Load a seed set from its folder, or from its seeds.jsonl (domain.json beside it).

    Every problem of domain.json and seeds.jsonl is reported together.
    """
    path = Path(folder_or_jsonl)
    if path.is_dir():
        folder, seeds_path = path, path / SEEDS_FILE
    elif path.is_file():
        folder, seeds_path = path.parent, path
    else:
        raise SeedSetError([f"{path}: no such seed set (expected a folder with {DOMAIN_FILE} and {SEEDS_FILE})"])

    problems: list[str] = []
    domain: Domain | None = None
    try:
        domain = load_domain(folder / DOMAIN_FILE)
    except SeedSetError as exc:
        problems.extend(exc.problems)

    seeds: list[Seed] = []
    try:
        text = seeds_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{seeds_path}: missing (a seed set folder needs {DOMAIN_FILE} and {SEEDS_FILE})")
    except UnicodeDecodeError as exc:
        problems.append(f"{seeds_path.name}: not UTF-8 text ({exc.reason})")
    else:
        seeds, seed_problems = _parse(text, seeds_path.name)
        problems.extend(seed_problems)

    if problems or domain is None:
        raise SeedSetError(problems)
    return SeedSet(domain=domain, seeds=seeds, path=folder.resolve())


def write_seed_set(folder: Path, domain: Domain, seeds: list[Seed]) -> SeedSet:
    """Store a validated set (e.g. an upload) as a new folder; never overwrites, never leaves half a folder.

    The files are written in a temporary sibling folder that is renamed into
    place, then read back with :func:`load_seed_set`, so what is stored is
    exactly what the loader accepts.
    """
    folder = Path(folder)
    _, problems = _parse("\n".join(seed.model_dump_json() for seed in seeds), SEEDS_FILE)
    if problems:
        raise SeedSetError(problems)
    if folder.exists():
        raise SeedSetError([f"{folder}: already exists (a stored seed set is never overwritten)"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / DOMAIN_FILE).write_text(domain.model_dump_json(indent=2) + "\n", encoding="utf-8")
        lines = [json.dumps(seed.model_dump(exclude_none=True), ensure_ascii=False) for seed in seeds]
        (staging / SEEDS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.rename(staging, folder)
    except BaseException:
        for leftover in staging.glob("*"):
            leftover.unlink()
        staging.rmdir()
        raise
    return load_seed_set(folder)
