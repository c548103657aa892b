"""From engine results to OpenAI's response bodies: choices, logprobs in both shapes, usage.

Kept apart from the Serve deployments (like carve.platform.requests) so the
shapes are checked without Ray. A token's string is the token decoded alone,
as OpenAI and vLLM return it; a token that is only part of a UTF-8 character
is written as OpenAI writes it, ``bytes:\\xe2\\x80``, so distinct tokens never
share a ``top_logprobs`` key.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Optional, Sequence

from carve.engine.batching import JobResult
from carve.engine.scoring import TokenLogprob
from carve.engine.tool_calls import Call, parse_calls
from carve.platform import api as oa
from carve.platform.requests import PlannedPrompt


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's table), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def token_bytes(tokenizer: Any, token_id: int) -> Optional[bytes]:
    """A token's raw bytes, for byte-level BPE and sentencepiece byte-fallback (``<0xE2>``) vocabularies; None otherwise."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return None
    if match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
        return bytes([int(match.group(1), 16)])
    table = _byte_decoder()
    return bytes(table[c] for c in piece) if piece and all(c in table for c in piece) else None


def token_text(tokenizer: Any, token_id: int) -> str:
    """The token decoded alone; ``bytes:\\x..`` when that is not whole characters."""
    text = str(tokenizer.decode([token_id]))
    if "\ufffd" in text and (raw := token_bytes(tokenizer, token_id)) is not None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def text_offsets(tokenizer: Any, ids: Sequence[int], start: int = 0) -> list[int]:
    """Each token's character offset in the decoded text, from token ``start`` on (a token inside a character: that character's)."""
    return [len(str(tokenizer.decode(list(ids[:i]))).rstrip("\ufffd")) for i in range(start, len(ids))]


def completion_logprobs(tokenizer: Any, entries: Sequence[Optional[TokenLogprob]], ids: Sequence[int], start: int = 0) -> oa.CompletionLogprobs:
    """The legacy shape over tokens ``ids[start:]`` (``entries[i]`` scores ``ids[i]``; None: no logprob, the first prompt token).

    Offsets count from the start of ``ids``: a stream sends each chunk's tokens with their place in the whole text.
    """
    tokens = [token_text(tokenizer, t) for t in ids[start:]]
    offsets = text_offsets(tokenizer, ids, start)
    logprobs: list[Optional[float]] = []
    tops: list[Optional[dict[str, float]]] = []
    for entry in entries[start:]:
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for t, lp in (*entry.top, (entry.token_id, entry.logprob)):  # best first; OpenAI: the chosen token is always listed
            top.setdefault(token_text(tokenizer, t), lp)  # two tokens of one text: the likelier one's
        tops.append(top)
    return oa.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def _top(tokenizer: Any, token_id: int, logprob: float) -> oa.TopLogprob:
    text = token_text(tokenizer, token_id)
    raw = token_bytes(tokenizer, token_id) if text.startswith("bytes:") else None
    return oa.TopLogprob(token=text, logprob=logprob, bytes=list(raw if raw is not None else text.encode("utf-8")))


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> oa.ChatLogprobs:
    """The chat shape: each generated token with its ``top_logprobs`` alternatives."""
    content = []
    for entry in entries:
        head = _top(tokenizer, entry.token_id, entry.logprob)
        content.append(oa.ChatTokenLogprob(**head.model_dump(), top_logprobs=[_top(tokenizer, t, lp) for t, lp in entry.top]))
    return oa.ChatLogprobs(content=content)


def usage(prompts: Sequence[PlannedPrompt], completion_tokens: int) -> oa.Usage:
    """Each prompt's tokens once (whatever n), and the tokens generated for every choice (with best_of, every candidate)."""
    prompt_tokens = sum(len(p.ids) for p in prompts)
    return oa.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def best_candidates(results: Sequence[JobResult], candidates: int, n: int) -> list[JobResult]:
    """``best_of``: of each prompt's ``candidates`` results (consecutive), the ``n`` of highest total logprob, best first."""
    if candidates == n:
        return list(results)
    kept: list[JobResult] = []
    for start in range(0, len(results), candidates):
        group = results[start : start + candidates]
        kept += sorted(group, key=lambda result: -sum(entry.logprob for entry in result.logprobs))[:n]
    return kept


def completion_choices(tokenizer: Any, body: oa.CompletionRequest, prompts: Sequence[PlannedPrompt], results: Sequence[JobResult]) -> list[oa.CompletionChoice]:
    """One choice per (prompt, n) in order, ``index`` = prompt * n + choice; echo puts the prompt (and its scores) first."""
    choices = []
    for index, result in enumerate(results):
        prompt = prompts[index // body.n]
        text = prompt.text + result.text if body.echo else result.text
        logprobs = None
        if body.logprobs is not None:
            entries: list[Optional[TokenLogprob]] = list(result.logprobs)
            ids = [e.token_id for e in result.logprobs]
            if body.echo:
                entries = list(result.prompt_logprobs or [None] * len(prompt.ids)) + entries
                ids = list(prompt.ids) + ids
            logprobs = completion_logprobs(tokenizer, entries, ids)
        choices.append(oa.CompletionChoice(index=index, text=text, finish_reason=result.finish_reason or "length", logprobs=logprobs))  # type: ignore[arg-type]
    return choices


def chat_choices(tokenizer: Any, body: oa.ChatCompletionRequest, results: Sequence[JobResult]) -> list[oa.ChatChoice]:
    choices = []
    for index, result in enumerate(results):
        content, calls = parse_calls(result.text, body.parallel_tool_calls) if body.calling() != "none" else (result.text, [])
        choices.append(oa.ChatChoice(
            index=index, message=oa.AssistantMessage(content=content or None if calls else content, tool_calls=tool_calls(calls) or None),
            finish_reason="tool_calls" if calls else result.finish_reason or "length",  # type: ignore[arg-type]
            logprobs=chat_logprobs(tokenizer, result.logprobs) if body.logprobs else None,
        ))
    return choices


def tool_calls(calls: Sequence[Call]) -> list[oa.ToolCall]:
    """The reply's calls in OpenAI's shape, each with a fresh id."""
    return [oa.ToolCall(id=oa.new_id("call"), function=oa.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
