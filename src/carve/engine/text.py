"""Prompt text rules, in one place for every layer: chat template, BOS, token counts, context size.

The engine encodes prompts with :func:`encode_prompt`; the gateway counts a
request's tokens and checks it against the context with the same functions,
so a count made before decoding is the count the engine sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

DEFAULT_CONTEXT = 2048  # when a model's config names no maximum position
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The messages in the model's chat template, ending where the assistant's reply starts (unless ``add_generation_prompt`` is False)."""
    return str(tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt))


def format_user_prompt(tokenizer: Any, text: str, use_chat_template: bool = True) -> str:
    """Wrap a user's text in the model's chat template when it has one; else the text as is."""
    if use_chat_template and has_chat_template(tokenizer):
        return chat_prompt(tokenizer, [{"role": "user", "content": text}])
    return text


def starts_with_bos(tokenizer: Any, prompt: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(bos)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt: text gets the tokenizer's special tokens unless it already starts with BOS; ids are used exactly."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=not starts_with_bos(tokenizer, prompt))["input_ids"])
    return [int(t) for t in prompt]


def count_prompt_tokens(tokenizer: Any, prompt: str | Sequence[int]) -> int:
    """Tokens of ``prompt`` as the engine encodes it."""
    return len(encode_prompt(tokenizer, prompt))


def longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token decodes to: its longest vocabulary entry.

    A text of C characters has at least C / this many tokens, so a prompt far
    over the context can be refused without tokenizing it.
    """
    entries = [*tokenizer.get_vocab(), *getattr(tokenizer, "all_special_tokens", [])]
    return max((len(entry) for entry in entries), default=1) or 1


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a piece of text inside a prompt (no special tokens), for cutting it at a token boundary."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def max_positions(config: Mapping[str, Any], default: int = DEFAULT_CONTEXT) -> int:
    """A model's context window from its config (a multimodal config's ``text_config`` first)."""
    text = config.get("text_config") or config
    for key in _POSITION_KEYS:
        if isinstance(text.get(key), int):
            return int(text[key])
    return default


def context_length(model_dir: Path) -> int:
    """The context window of the model in a Hugging Face folder, from its config.json."""
    return max_positions(json.loads((Path(model_dir) / "config.json").read_text()))
