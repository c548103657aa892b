"""Streamed answers in OpenAI's chunk format, for every request shape: several prompts, n > 1, echo, logprobs.

Each choice has its own engine stream; :func:`interleave` reads them all and
yields events in the order they are decoded, whichever choice they belong to,
and :class:`ChoiceStream` turns one choice's events into its chunk payloads
(echoed prompt first, each token's logprobs with the chunk that carries it,
text offsets counted over the choice's whole text as the unstreamed answer
counts them). Kept apart from the Serve deployments, like
carve.platform.responses, so the shapes are checked without Ray.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Sequence, Union

from carve.engine.batching import Job, JobEvent
from carve.engine.scoring import TokenLogprob
from carve.engine.tool_calls import CallSplitter
from carve.platform import api as oa
from carve.platform.engine_client import next_event
from carve.platform.requests import PlannedPrompt
from carve.platform.responses import chat_logprobs, completion_logprobs, tool_calls

ChunkChoice = Union[oa.CompletionChunkChoice, oa.ChatChunkChoice]


@dataclass
class ChoiceStream:
    """One choice while it streams: what it has sent so far (its tokens for logprob offsets, its token count for usage)."""

    index: int
    job: Job
    prompt: PlannedPrompt
    chat: bool
    echo: bool = False
    logprobs: Optional[int] = None  # alternatives per token (None: the request asks for no logprobs)
    ids: list[int] = field(default_factory=list)  # the tokens of the choice's text so far (with echo, the prompt's first)
    entries: list[Optional[TokenLogprob]] = field(default_factory=list)  # entries[i] scores ids[i]
    sent: int = 0  # tokens whose logprobs went out
    echoed: bool = False
    completion_tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    queue_s: Optional[float] = None
    finished: bool = False
    calls: Optional[CallSplitter] = None  # a chat reply that may call tools: its calls held back until it ends

    def take(self, event: JobEvent, tokenizer: Any) -> Optional[ChunkChoice]:
        """This choice's chunk payload for ``event`` (None when it carries nothing to send)."""
        if self.queue_s is None:
            self.queue_s = event.queue_s
        text = event.delta
        if self.echo and not self.echoed:
            self.echoed = True
            text = self.prompt.text + text
            if event.prompt_logprobs is not None:
                self.ids.extend(self.prompt.ids)
                self.entries.extend(event.prompt_logprobs)
        self.completion_tokens += event.tokens
        if event.tokens:
            self.token_times.append(event.emitted_at)
        if event.logprob is not None:
            self.ids.append(event.logprob.token_id)
            self.entries.append(event.logprob)
        self.finished = self.finished or event.final
        new_tokens = len(self.ids) > self.sent
        if not (text or event.finish_reason or new_tokens):
            return None
        choice = self._chat_choice(text, event, tokenizer) if self.chat else self._completion_choice(text, event, tokenizer)
        self.sent = len(self.ids)
        return choice if choice.finish_reason or choice.logprobs is not None or _carries_text(choice) else None

    def _completion_choice(self, text: str, event: JobEvent, tokenizer: Any) -> oa.CompletionChunkChoice:
        logprobs = completion_logprobs(tokenizer, self.entries, self.ids, self.sent) if self.logprobs is not None else None
        return oa.CompletionChunkChoice(index=self.index, text=text, finish_reason=event.finish_reason, logprobs=logprobs)  # type: ignore[arg-type]

    def _chat_choice(self, text: str, event: JobEvent, tokenizer: Any) -> oa.ChatChunkChoice:
        logprobs = None
        if self.logprobs is not None:
            logprobs = chat_logprobs(tokenizer, [e for e in self.entries[self.sent :] if e is not None])
        if self.calls is None:
            return oa.ChatChunkChoice(index=self.index, delta=oa.ChatDelta(content=text), finish_reason=event.finish_reason, logprobs=logprobs)  # type: ignore[arg-type]
        content, calls = self.calls.feed(text), []
        if event.final:
            rest, calls = self.calls.finish()
            content += rest
        deltas = [oa.ToolCallDelta(index=i, id=call.id, function=call.function) for i, call in enumerate(tool_calls(calls))]
        return oa.ChatChunkChoice(
            index=self.index, delta=oa.ChatDelta(content=content, tool_calls=deltas or None), logprobs=logprobs,
            finish_reason="tool_calls" if calls else event.finish_reason,  # type: ignore[arg-type]
        )


def _carries_text(choice: ChunkChoice) -> bool:
    if isinstance(choice, oa.CompletionChunkChoice):
        return bool(choice.text)
    return bool(choice.delta.content or choice.delta.tool_calls)


def choice_streams(body: Union[oa.CompletionRequest, oa.ChatCompletionRequest], prompts: Sequence[PlannedPrompt]) -> list[ChoiceStream]:
    """One stream per choice, ``index`` = prompt * n + choice, as the unstreamed answer numbers them."""
    chat = isinstance(body, oa.ChatCompletionRequest)
    echo = isinstance(body, oa.CompletionRequest) and body.echo
    calls = isinstance(body, oa.ChatCompletionRequest) and body.calling() != "none"
    return [
        ChoiceStream(
            index=p * body.n + c, job=job, prompt=prompt, chat=chat, echo=echo, logprobs=body.generated_logprobs(),
            calls=CallSplitter(body.parallel_tool_calls) if calls else None,  # type: ignore[union-attr]
        )
        for p, prompt in enumerate(prompts)
        for c, job in enumerate(prompt.jobs)
    ]


async def interleave(firsts: Sequence[JobEvent], streams: Sequence[Optional[Any]]) -> AsyncIterator[tuple[int, JobEvent]]:
    """(choice, event) from every choice's stream as they come: each first event (read already), then the rest.

    Ends when every choice has had its final event. A stream that ends without
    one gets an error event; a lost replica's ApiError (from
    :func:`next_event`) is raised. The readers stop when the caller stops
    reading; cancelling the engine streams is the caller's part.
    """
    queue: asyncio.Queue[tuple[int, Union[JobEvent, Exception]]] = asyncio.Queue()

    async def read(index: int, events: Any) -> None:
        try:
            while True:
                event = await next_event(events)
                await queue.put((index, event))
                if event.final:
                    return
        except StopAsyncIteration:
            await queue.put((index, JobEvent(error="the engine stopped before finishing this request", error_kind="internal")))
        except Exception as exc:  # a lost replica (ApiError) or the stream's own failure: the consumer decides
            await queue.put((index, exc))

    open_choices = 0
    readers: list[asyncio.Task[None]] = []
    try:
        for index, (first, events) in enumerate(zip(firsts, streams)):
            yield index, first
            if not first.final and events is not None:
                open_choices += 1
                readers.append(asyncio.ensure_future(read(index, events)))
        while open_choices:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.final:
                open_choices -= 1
            yield index, item
    finally:
        for reader in readers:
            reader.cancel()
