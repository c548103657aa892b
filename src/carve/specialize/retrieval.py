"""The unlabelled domain corpus and its BM25 index (the paper's retriever, eq. 1).

The corpus is a JSONL file of ``{id, title, text}``; it is validated in full
before a run starts, naming the line and field of every fault. The index is
built once per corpus content and cached under ``<cache>/<hash>``: later runs
(and resumed ones) load it instead of re-indexing. The cache is written to a
temporary folder and renamed, so a killed build never leaves a half index.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from carve.common.errors import error_field
from carve.common.hashing import sha256_file
from carve.common.jsonl import json_object_lines

INDEX_DONE = "carve-index.json"


class CorpusError(ValueError):
    """A corpus file that cannot be used; ``problems`` lists every fault (file, line, field)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__("corpus refused:\n" + "\n".join(f"  - {p}" for p in shown))


class Document(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    id: str
    title: str = ""
    text: str

    @field_validator("id", "text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def passage(self, max_words: int | None = None) -> str:
        """Title and text as the response prompt shows them, clipped to ``max_words``."""
        body = f"{self.title.strip()}. {self.text.strip()}" if self.title.strip() else self.text.strip()
        words = body.split()
        if max_words is not None and len(words) > max_words:
            return " ".join(words[:max_words]) + " ..."
        return " ".join(words)


@dataclass(frozen=True)
class Corpus:
    path: Path
    documents: list[Document]
    content_hash: str

    def by_id(self) -> dict[str, Document]:
        return {d.id: d for d in self.documents}


def load_corpus(path: Path) -> Corpus:
    """Read and validate the whole corpus; CorpusError lists every bad line."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError([f"{path}: no such file (expected a JSONL corpus of {{id, title, text}})"])
    problems: list[str] = []
    documents: list[Document] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError([f"{path}: not UTF-8 text ({exc.reason})"]) from exc
    for number, where, record in json_object_lines(text, path.name, problems):
        try:
            document = Document.model_validate(record)
        except ValidationError as exc:
            for error in exc.errors():
                field = error_field(error)
                why = "is required" if error["type"] == "missing" else error["msg"]
                problems.append(f"{where}: field '{field}': {why}")
            continue
        if document.id in seen:
            problems.append(f"{where}: field 'id': duplicate id {document.id!r} (first on line {seen[document.id]})")
            continue
        seen[document.id] = number
        documents.append(document)
    if not documents and not problems:
        problems.append(f"{path}: no documents")
    if problems:
        raise CorpusError(problems)
    return Corpus(path.resolve(), documents, sha256_file(path))


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), return_ids=False, show_progress=False)  # type: ignore[return-value]


class BM25Index:
    """bm25s over the corpus passages; ``search`` returns (document index, score) pairs, best first."""

    def __init__(self, retriever: Any, size: int):
        self.retriever = retriever
        self.size = size

    @classmethod
    def open(cls, corpus: Corpus, cache_root: Path) -> "BM25Index":
        """Load the cached index of this corpus content, building (and caching) it on first use."""
        import bm25s

        folder = cache_root / corpus.content_hash.split(":", 1)[1][:32]
        if (folder / INDEX_DONE).is_file():
            return cls(bm25s.BM25.load(str(folder), show_progress=False), len(corpus.documents))
        retriever = bm25s.BM25()
        retriever.index(_tokenize([d.passage() for d in corpus.documents]), show_progress=False)
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".index-", dir=cache_root))
        try:
            retriever.save(str(staging), show_progress=False)
            info = {"corpus": str(corpus.path), "content_hash": corpus.content_hash, "documents": len(corpus.documents)}
            (staging / INDEX_DONE).write_text(json.dumps(info, indent=2))
            if folder.exists():  # built meanwhile by another run: keep it
                shutil.rmtree(staging)
            else:
                os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(retriever, len(corpus.documents))

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        k = min(k, self.size)
        docs, scores = self.retriever.retrieve(_tokenize(queries), k=k, show_progress=False)
        return [[(int(d), float(s)) for d, s in zip(row_d, row_s)] for row_d, row_s in zip(docs, scores)]


def softmax(scores: Sequence[float]) -> list[float]:
    """p_ret(d_j | x) of eq. 2: the retriever's scores normalised over the k documents."""
    if not scores:
        return []
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]
