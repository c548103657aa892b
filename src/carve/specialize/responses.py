"""Stages 2-3: retrieval (eq. 1) and response generation with marginalization (eq. 2).

Retrieval stores, per instruction, the top-k document ids, their BM25 scores
and p_ret = softmax(scores). Response generation sends one request per
instruction to the engine: rule ``mixture`` with one branch per document
(prompt = Table 3 response prompt + that document + the task, weight =
p_ret), so every decoding step samples from sum_j p_ret(d_j|x) p_lm(y|x,d_j).
``top1`` keeps only the best document (rule ``single``), ``none`` prompts
without a document: the paper's Table 2 ablation.

Iteration 2 (eq. 3) decodes with rule ``contrast``: the specialized adapter
against the base model on the same prompt. ``contrast`` takes exactly two
branches, so the document cannot also be marginalized: both branches see the
best document (or none with ``--retrieval none``).

Decoding is greedy (the paper gives no response sampling settings), so a
response depends only on its prompt: resumed runs produce the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carve.common.progress import stage
from carve.engine.templates import STOP_STRINGS
from carve.specialize.config import RunConfig
from carve.specialize.prompts import response_prompt
from carve.specialize.retrieval import BM25Index, Corpus, softmax
from carve.specialize.seeds import Domain
from carve.specialize.store import JsonlStore

RETRIEVAL = "retrieval.jsonl"
RESPONSES = "responses.jsonl"
RESPONSE_STOPS = STOP_STRINGS + ("\nInstruction:", "\nDocument:")


def query_of(item: dict[str, Any]) -> str:
    """x = i (+) c: the instruction and its input."""
    return f"{item['instruction']}\n{item['input']}".strip()


def retrieve(index: BM25Index, corpus: Corpus, instructions: list[dict[str, Any]], k: int, folder: Path, batch: int = 64) -> JsonlStore:
    """Top-k documents of every instruction, appended to retrieval.jsonl; resumes by id."""
    store = JsonlStore(folder / RETRIEVAL)
    missing = [item for item in instructions if item["id"] not in store]
    with stage("retrieval", len(instructions), "queries") as progress:
        progress.resumed(len(instructions) - len(missing))
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            hits = index.search([query_of(item) for item in chunk], k)
            store.append(
                {
                    "id": item["id"],
                    "docs": [corpus.documents[d].id for d, _ in row],
                    "scores": [round(s, 6) for _, s in row],
                    "weights": softmax([s for _, s in row]),
                }
                for item, row in zip(chunk, hits)
            )
            progress.advance(len(chunk))
    return store


def build_request(
    config: RunConfig,
    domain: Domain,
    tokenizer: Any,
    item: dict[str, Any],
    hit: dict[str, Any] | None,
    documents: dict[str, Any],
    contrast_adapter: str | None = None,
    adapter: str | None = None,
) -> Any:
    """The engine request for one instruction (see the module docstring for each mode).

    ``adapter`` writes the response instead of the base (``respond_with
    seed_adapter``); contrast decoding always pits ``contrast_adapter`` against the base.
    """
    from carve.engine.decoding import Branch, GenerationRequest, Sampling

    sampling = Sampling(max_new_tokens=config.response_max_new_tokens, temperature=0.0, stop=RESPONSE_STOPS, alpha=config.contrast_alpha)

    def prompt(doc_id: str | None) -> str:
        text = documents[doc_id].passage(config.document_words) if doc_id is not None else None
        return response_prompt(domain, item["instruction"], item["input"], text, tokenizer, config.prompt_style)

    doc_ids = shown_document_ids(config, hit, contrast_adapter is not None)
    if contrast_adapter is not None:
        shown = prompt(doc_ids[0] if doc_ids else None)
        return GenerationRequest((Branch(shown, contrast_adapter), Branch(shown, None)), "contrast", sampling)
    if len(doc_ids) > 1:
        weights = hit["weights"]  # type: ignore[index]
        branches = tuple(Branch(prompt(d), adapter, max(w, 1e-30)) for d, w in zip(doc_ids, weights))
        return GenerationRequest(branches, "mixture", sampling)
    return GenerationRequest.single(prompt(doc_ids[0] if doc_ids else None), adapter, sampling)


def shown_document_ids(config: RunConfig, hit: dict[str, Any] | None, contrast: bool = False) -> list[str]:
    """The documents a response's prompts show: all k when marginalizing, else the best one, or none."""
    if hit is None or config.retrieval == "none":
        return []
    doc_ids = list(hit["docs"])
    return doc_ids if config.retrieval == "marginal" and not contrast else doc_ids[:1]


def shown_passages(config: RunConfig, hit: dict[str, Any] | None, documents: dict[str, Any], contrast: bool = False) -> list[str]:
    """The passages themselves, as the prompts showed them (the response filters compare against them)."""
    return [documents[d].passage(config.document_words) for d in shown_document_ids(config, hit, contrast)]


def generate_responses(
    engine: Any,
    config: RunConfig,
    domain: Domain,
    instructions: list[dict[str, Any]],
    hits: JsonlStore | None,
    corpus: Corpus | None,
    folder: Path,
    contrast_adapter: str | None = None,
    label: str = "responses",
    adapter: str | None = None,
) -> JsonlStore:
    """One response per instruction, ``response_batch`` requests decoding at a time (the next joining as one
    finishes); each appended to the store as it finishes, so a resumed run asks only for the missing ones."""
    store = JsonlStore(folder / RESPONSES)
    documents = corpus.by_id() if corpus is not None else {}
    missing = [item for item in instructions if item["id"] not in store]
    requests = [
        build_request(config, domain, engine.tokenizer, item, hits.items.get(item["id"]) if hits is not None else None, documents, contrast_adapter, adapter)
        for item in missing
    ]
    max_rows = config.response_batch * max((len(r.branches) for r in requests), default=1)  # a request has a row per branch
    with stage(label, len(instructions), "responses") as progress:
        progress.resumed(len(instructions) - len(missing))
        for position, completion in engine.complete(requests, max_rows=max_rows):
            item, request = missing[position], requests[position]
            store.append([{
                "id": item["id"],
                "instruction": item["instruction"],
                "input": item["input"],
                "output": completion.text.strip(),
                "finish_reason": completion.finish_reason,
                "rule": request.rule,
                "branches": len(request.branches),
                "adapter": request.branches[0].adapter,
                "tokens": len(completion.token_ids),
            }])
            progress.advance(1)
    return store
