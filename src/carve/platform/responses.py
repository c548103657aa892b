"""From engine results to OpenAI's response bodies: choices, logprobs in both shapes, usage.

Kept apart from the Serve deployments (like carve.platform.requests) so the
shapes are checked without Ray. Token strings are each token decoded alone,
as OpenAI and vLLM return them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from carve.engine.batching import JobResult
from carve.engine.scoring import TokenLogprob
from carve.platform import api as oa
from carve.platform.requests import PlannedPrompt


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def completion_logprobs(tokenizer: Any, entries: Sequence[Optional[TokenLogprob]], ids: Sequence[int]) -> oa.CompletionLogprobs:
    """The legacy shape over tokens ``ids`` (``entries[i]`` scores ``ids[i]``; None: no logprob, the first prompt token)."""
    tokens, offsets = [], []
    offset = 0
    for token_id in ids:
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    logprobs: list[Optional[float]] = []
    tops: list[Optional[dict[str, float]]] = []
    for entry in entries:
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(entry.logprob)
        top = {token_text(tokenizer, t): lp for t, lp in entry.top}
        top.setdefault(token_text(tokenizer, entry.token_id), entry.logprob)  # OpenAI: the chosen token is always listed
        tops.append(top)
    return oa.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def _top(tokenizer: Any, token_id: int, logprob: float) -> oa.TopLogprob:
    text = token_text(tokenizer, token_id)
    return oa.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> oa.ChatLogprobs:
    """The chat shape: each generated token with its ``top_logprobs`` alternatives."""
    content = []
    for entry in entries:
        head = _top(tokenizer, entry.token_id, entry.logprob)
        content.append(oa.ChatTokenLogprob(**head.model_dump(), top_logprobs=[_top(tokenizer, t, lp) for t, lp in entry.top]))
    return oa.ChatLogprobs(content=content)


def usage(prompts: Sequence[PlannedPrompt], results: Sequence[JobResult]) -> oa.Usage:
    """Each prompt's tokens once (whatever n), every choice's generated tokens."""
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(r.completion_tokens for r in results)
    return oa.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


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
    return [
        oa.ChatChoice(
            index=index, message=oa.AssistantMessage(content=result.text), finish_reason=result.finish_reason or "length",  # type: ignore[arg-type]
            logprobs=chat_logprobs(tokenizer, result.logprobs) if body.logprobs else None,
        )
        for index, result in enumerate(results)
    ]
