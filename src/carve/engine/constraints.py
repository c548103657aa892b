"""Structured output: a grammar that every generated token must keep the text inside (JSON schema, regex, Lark).

llguidance compiles the grammar and, at each step, gives the set of tokens
that keep the text a prefix of the grammar's language; the others get score
-inf before the request's token is picked, so greedy and sampled requests
alike can only write text the grammar accepts. It ends the request when the
grammar admits no longer text (or the model picks an end token where the
grammar is complete). The cost is a mask per constrained row per step (well
under a millisecond after the first), nothing for the rows without one.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Collection

from carve.engine.requests import EngineError, Grammar

if TYPE_CHECKING:  # pragma: no cover
    import torch

# One llguidance tokenizer per (Hugging Face tokenizer, vocabulary width, end tokens): building it reads the
# whole vocabulary (~0.8 s for SmolLM2's 49K tokens), so it is kept for the engine's life.
_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any]] = {}
_TOKENIZERS_LOCK = threading.Lock()


@lru_cache(maxsize=256)
def compiled(grammar: Grammar) -> str:
    """llguidance's grammar text for ``grammar``; EngineError naming what is wrong when it does not compile.

    Kept per grammar: the gateway checks it, then every choice of the request builds its matcher from it."""
    import llguidance

    try:
        if grammar.kind == "json_schema":
            text = llguidance.LLMatcher.grammar_from_json_schema(grammar.source, defaults={"whitespace_flexible": False})
        elif grammar.kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(grammar.source)
        else:
            text = llguidance.LLMatcher.grammar_from_lark(grammar.source)
    except ValueError as exc:
        raise EngineError(f"the {grammar.kind} does not compile: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(text)
    if error:
        raise EngineError(f"the {grammar.kind} does not compile: {error}")
    return text


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
    return Grammar("json_schema", json.dumps({"type": "object"}))


def choice_grammar(choices: Collection[str]) -> Grammar:
    """Exactly one of ``choices`` (vLLM's ``choice``): a Lark alternation of the literal strings."""
    if not choices:
        raise EngineError("a choice constraint needs at least one choice")
    return Grammar("lark", "start: " + " | ".join(json.dumps(c) for c in choices))


def prepare(tokenizer: Any, vocab: int, eos_ids: Collection[int]) -> Any:
    """llguidance's view of ``tokenizer`` over ``vocab`` logits, built once (an engine replica calls this at start,
    so the first constrained request does not stall the decoding thread); EngineError when it cannot be built."""
    import llguidance.hf

    key = (id(tokenizer), vocab, tuple(sorted(eos_ids)))
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:  # the tokenizer is kept beside its llguidance twin so its id is never reused
            try:
                _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=sorted(eos_ids) or None))
            except Exception as exc:  # a slow tokenizer, a vocabulary wider than the logits, ...
                raise EngineError(f"structured output is not available for this tokenizer: {exc}") from None
        return _TOKENIZERS[key][1]


class TokenConstraint:
    """One request's grammar state: which tokens it may pick next, advanced by each token it picks."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab: int, eos_ids: Collection[int]):
        import llguidance
        import llguidance.torch
        import torch

        ll_tokenizer = prepare(tokenizer, vocab, eos_ids)
        self.matcher = llguidance.LLMatcher(ll_tokenizer, compiled(grammar), log_level=0)
        if self.matcher.is_error():
            raise EngineError(f"the {grammar.kind} does not compile: {self.matcher.get_error()}")
        self.vocab = vocab
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self, device: "torch.device") -> "torch.Tensor":
        """[vocab] bools: the tokens the grammar allows next (computed once per step, then applied where needed)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # bit j of word w allows token 32w + j (unpacked here: llguidance's own kernel needs torch.compile)
        words = self.bitmask[0].to(device)
        return ((words.unsqueeze(1) >> self._bits.to(device)) & 1).flatten()[: self.vocab].bool()

    def accept(self, token: int) -> bool:
        """Advance past the picked ``token``; True when the text is complete (the grammar allows nothing more).

        A token the grammar refuses (only a bug could pick one) also ends the text: the request stops
        there rather than failing its whole batch.
        """
        return not self.matcher.consume_token(token) or self.matcher.is_error() or self.matcher.is_stopped()
