"""Append-only JSONL artifacts that survive a SIGKILL: one fsync'd line per finished item.

Every stage writes its items as soon as they are done, each line carrying the
item's key. On resume, complete lines are read back, a torn last line (the
process died mid-write) is cut off, and the stage generates only the keys
that are missing. Whole-file artifacts (filtered lists, manifests) are
written to a temporary file and renamed, so a reader sees the old or the new
file, never a mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class JsonlStore:
    """Items keyed by ``key_field``, appended one fsync'd line at a time."""

    def __init__(self, path: Path, key_field: str = "id"):
        self.path = Path(path)
        self.key_field = key_field
        self.items: dict[Any, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0  # byte length of the complete, parseable prefix
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            self.items.setdefault(record[self.key_field], record)
            good += len(raw)
        if good != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())

    def __contains__(self, key: Any) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write records (skipping keys already stored) and fsync before returning."""
        fresh = [r for r in records if r[self.key_field] not in self.items]
        if not fresh:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh))
            handle.flush()
            os.fsync(handle.fileno())
        for record in fresh:
            self.items[record[self.key_field]] = record

    def values(self) -> list[dict[str, Any]]:
        return list(self.items.values())


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
