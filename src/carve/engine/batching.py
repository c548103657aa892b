"""Run many requests for many adapters as one engine call: the heart of an engine replica.

A *job* is one generation request already tokenized by the gateway. A batch of
jobs is decoded by ONE ``engine.stream`` call (per-row adapters in one forward
pass), split only when it names more distinct adapters than the cache holds.
Every job receives its events through ``emit(job_index, event)``: text deltas,
then one final event with a finish reason or an error. An adapter that fails to
load fails its own jobs only; the rest of the batch decodes. Jobs that ask
for their prompt's logprobs (``echo``) are scored first, in one forward pass
per group (carve.engine.scoring); a job with ``max_new_tokens`` 0 is only scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional, Sequence

from carve.artifact import AdapterRef
from carve.engine.adapter_cache import AdapterCache, AdapterLoadError, CacheFull, Weighted
from carve.engine.requests import Branch, GenerationRequest, Grammar, Sampling, StreamEvent
from carve.engine.scoring import AdapterSpec, TokenLogprob, branches_of, score_prompts, top_logprobs


@dataclass(frozen=True)
class Job:
    """One request as an engine replica sees it (plain data, pickled across Ray).

    A text prompt is tokenized by the engine itself, exactly as a direct
    ``engine.generate`` call would; token ids are used exactly. The gateway
    counted its tokens already.
    """

    prompt: str | tuple[int, ...]
    prompt_tokens: int
    adapter: Optional[AdapterRef]
    max_new_tokens: int  # 0: nothing generated (echo of the scored prompt only)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    mixture: tuple[tuple[Optional[AdapterRef], float], ...] = ()  # a mixture: (adapter or base, weight) per branch
    space: str = "output"  # a mixture's: "output" (engine rule mixture) or "weights" (one merged adapter, AdapterCache.merge)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: Optional[int] = None  # each generated token's logprob with this many alternatives (None: none)
    prompt_logprobs: Optional[int] = None  # score the prompt (echo): each token's logprob with this many alternatives
    grammar: Optional[Grammar] = None  # structured output (carve.engine.constraints)

    @property
    def needs_engine(self) -> bool:
        """False for an echo of the prompt alone without logprobs: the answer is known without the model."""
        return self.max_new_tokens > 0 or self.prompt_logprobs is not None

    def refs(self) -> list[AdapterRef]:
        """Every adapter this job decodes with (a mixture's, else its single adapter)."""
        if self.mixture:
            return [ref for ref, _ in self.mixture if ref is not None]
        return [self.adapter] if self.adapter is not None else []

    def sampling(self) -> Sampling:
        return Sampling(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop=self.stop, ignore_eos=self.ignore_eos, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, logit_bias=self.logit_bias, grammar=self.grammar,
        )


@dataclass(frozen=True)
class EngineLoad:
    """What an engine replica was doing when it finished a job (reported with the job's final event, for metrics)."""

    replica: str
    running: int  # sequences (KV rows) decoding
    waiting: int  # jobs queued for admission
    step_s: float  # mean time of a decoding step, recent steps
    step_tokens: float  # mean tokens run per step (decoded rows plus prefill chunks), recent steps
    steps: int = 0  # decoding steps run since the replica started
    cancelled: int = 0  # jobs whose callers went away, since the replica started
    cached_prompt_tokens: int = 0  # prompt tokens copied from the prefix cache instead of run, since the replica started
    drafted_tokens: int = 0  # draft tokens checked (speculative decoding), since the replica started
    accepted_draft_tokens: int = 0  # of them, kept


@dataclass
class JobEvent:
    """New text of one job; the last event has ``finish_reason`` or ``error`` set."""

    delta: str = ""
    tokens: int = 0
    finish_reason: Optional[str] = None  # OpenAI's: "stop" | "length"
    error: Optional[str] = None
    error_kind: Optional[str] = None  # "adapter_load" | "overloaded" | "cancelled" | "internal"
    retry_after_s: Optional[float] = None  # with "overloaded": when to try again
    prompt_tokens: int = 0
    loaded: list[str] = field(default_factory=list)  # adapters loaded for this job (metrics)
    evicted: list[str] = field(default_factory=list)
    logprob: Optional[TokenLogprob] = None  # the generated token's, when the job asks for logprobs
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # once, before any token, when the job scores its prompt
    queue_s: Optional[float] = None  # on the first event: time from submission to admission into the running batch
    load: Optional[EngineLoad] = None  # on the final event, when the replica schedules continuously
    emitted_at: float = field(default_factory=time.time)  # wall clock (inter-token latency of non-streamed jobs)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class JobResult:
    """A whole job's outcome, for non-streaming requests."""

    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    error_kind: Optional[str] = None
    retry_after_s: Optional[float] = None
    loaded: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    queue_s: Optional[float] = None
    load: Optional[EngineLoad] = None
    token_times: list[float] = field(default_factory=list)  # when each generated token was emitted (wall clock)

    def add(self, event: JobEvent) -> None:
        self.text += event.delta
        if event.tokens:
            self.token_times.append(event.emitted_at)
        if event.queue_s is not None:
            self.queue_s = event.queue_s
        if event.load is not None:
            self.load = event.load
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.completion_tokens += event.tokens
        self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
        self.loaded += event.loaded
        self.evicted += event.evicted
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        if event.error:
            self.error, self.error_kind, self.retry_after_s = event.error, event.error_kind, event.retry_after_s


Emit = Callable[[int, JobEvent], None]
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def engine_request(weighted: Weighted, prompt: str, sampling: Sampling, engine_name: Callable[[AdapterRef], str]) -> GenerationRequest:
    """The engine request of an output-space decision: rule ``single`` for one branch, ``mixture`` over one branch per adapter.

    ``engine_name(ref)`` names the adapter in the engine (None: the base).
    """
    branches = tuple(Branch(prompt, engine_name(ref) if ref is not None else None, w) for ref, w in weighted)
    return GenerationRequest(branches, "mixture" if len(branches) > 1 else "single", sampling)


def job_spec(job: Job, names: dict[str, str], cache: AdapterCache, pinned: Collection[str] = ()) -> AdapterSpec:
    """What a job decodes under, in engine names (``names``: adapter key -> engine name): an adapter or None (the base),
    a merged adapter (built now if not held; ``pinned`` merges are not evicted for it), or mixture branches."""

    def engine_name(ref: AdapterRef) -> str:
        return names[ref.key]

    if job.mixture and job.space == "weights":
        return cache.merge(job.mixture, engine_name, pinned=pinned)
    if job.mixture:
        return tuple((engine_name(ref) if ref is not None else None, w) for ref, w in job.mixture)
    return names[job.adapter.key] if job.adapter else None


def job_request(job: Job, spec: AdapterSpec) -> GenerationRequest:
    """The engine request of a job: one branch (rule single) or one per mixture branch (rule mixture)."""
    branches = tuple(Branch(job.prompt, name, w) for name, w in branches_of(spec))
    return GenerationRequest(branches, "mixture" if len(branches) > 1 else "single", job.sampling(), record_scores=job.logprobs is not None)


def job_event(job: Job, event: StreamEvent) -> JobEvent:
    """A decoding step's event of a job as its caller sees it (finish reason in OpenAI's words, the token's logprobs if asked)."""
    out = JobEvent(delta=event.delta, tokens=1 if event.token_id is not None else 0, prompt_tokens=job.prompt_tokens)
    if event.scores is not None and event.token_id is not None:
        out.logprob = top_logprobs(event.scores, event.token_id, job.logprobs or 0)
    if event.finish_reason:
        out.finish_reason = _FINISH[event.finish_reason]
    return out


def prompt_events(engine: Any, jobs: Sequence[Job], specs: Sequence[AdapterSpec]) -> list[JobEvent]:
    """Score the jobs' prompts in one engine call: each job's event with its prompt logprobs (final when it generates nothing)."""
    results = score_prompts(engine, [engine.encode(job.prompt) for job in jobs], list(specs), max(job.prompt_logprobs or 0 for job in jobs))
    events: list[JobEvent] = []
    for job, scores in zip(jobs, results):
        k = job.prompt_logprobs or 0
        out = JobEvent(prompt_tokens=job.prompt_tokens)
        out.prompt_logprobs = [s if s is None else TokenLogprob(s.token_id, s.logprob, s.top[:k]) for s in scores]
        if job.max_new_tokens == 0:
            out.finish_reason = "length"
        events.append(out)
    return events


def with_first(first: Optional[JobEvent], event: JobEvent) -> JobEvent:
    """``event`` carrying what the job's first event reports (adapter loads and evictions, queue time), if it is the first."""
    if first is not None:
        event.loaded, event.evicted = first.loaded + event.loaded, first.evicted + event.evicted
        event.queue_s = first.queue_s if event.queue_s is None else event.queue_s
    return event


def split_by_capacity(jobs: Sequence[Job], capacity: int) -> list[list[int]]:
    """Consecutive groups of job indices, each naming at most ``capacity`` distinct adapters (a mixture counts all of its own)."""
    groups: list[list[int]] = []
    seen: set[str] = set()
    for i, job in enumerate(jobs):
        keys = {ref.key for ref in job.refs()}
        if not groups or (seen and len(seen | keys) > max(capacity, len(seen))):
            groups.append([])
            seen = set()
        groups[-1].append(i)
        seen |= keys
    return groups


class BatchRunner:
    """Decodes batches of jobs on one engine, loading their adapters through the cache."""

    def __init__(self, engine: Any, cache: AdapterCache):
        self.engine = engine
        self.cache = cache

    def run(self, jobs: Sequence[Job], emit: Emit) -> None:
        """Decode ``jobs``; every job gets exactly one final event."""
        for group in split_by_capacity(jobs, self.cache.capacity):
            self._run_group(jobs, group, emit)

    def _score(self, jobs: Sequence[Job], indices: list[int], specs: dict[int, AdapterSpec], first_event: dict[int, JobEvent], emit: Emit) -> set[int]:
        """Score the prompts of ``jobs[indices]`` in one call and emit each its prompt logprobs (final when it generates nothing).

        Returns the jobs scored; on an engine failure each of them gets the error instead.
        """
        try:
            events = prompt_events(self.engine, [jobs[i] for i in indices], [specs[i] for i in indices])
        except Exception as exc:
            for i in indices:
                emit(i, JobEvent(error=f"{type(exc).__name__}: {exc}", error_kind="internal", prompt_tokens=jobs[i].prompt_tokens))
            return set()
        for i, scored in zip(indices, events):
            emit(i, with_first(first_event.pop(i, None), scored))
        return set(indices)

    def _run_group(self, jobs: Sequence[Job], group: list[int], emit: Emit) -> None:
        names: dict[str, str] = {}  # adapter key -> engine name
        failed: dict[str, str] = {}  # adapter key -> why it did not load
        first_event: dict[int, JobEvent] = {}  # a load is reported on the first job that caused it
        for i in group:
            for ref in jobs[i].refs():
                if ref.key in names or ref.key in failed:
                    continue
                try:
                    got = self.cache.acquire(ref, pinned=names.keys())
                except (AdapterLoadError, CacheFull) as exc:
                    failed[ref.key] = str(exc)
                    continue
                names[ref.key] = got.engine_name
                if got.loaded:
                    event = first_event.setdefault(i, JobEvent())
                    event.loaded.append(ref.key)
                    event.evicted += got.evicted
        specs: dict[int, AdapterSpec] = {}
        for i in group:
            why = next((failed[ref.key] for ref in jobs[i].refs() if ref.key in failed), None)
            if why is not None:
                emit(i, JobEvent(error=why, error_kind="adapter_load", prompt_tokens=jobs[i].prompt_tokens))
                continue
            try:
                specs[i] = job_spec(jobs[i], names, self.cache)
            except Exception as exc:  # a weight-space merge that failed: this job only
                emit(i, JobEvent(error=f"mixture could not be built: {type(exc).__name__}: {exc}", error_kind="internal"))
        to_score = [i for i in specs if jobs[i].prompt_logprobs is not None]
        scored = self._score(jobs, to_score, specs, first_event, emit) if to_score else set()
        ready = [i for i in specs if jobs[i].max_new_tokens > 0 and (i in scored or i not in to_score)]
        if not ready:
            return
        requests = [job_request(jobs[i], specs[i]) for i in ready]
        done: set[int] = set()
        try:
            for event in self.engine.stream(requests):
                job = ready[event.index]
                out = with_first(first_event.pop(job, None), job_event(jobs[job], event))
                if out.finish_reason:
                    done.add(job)
                emit(job, out)
        except Exception as exc:  # the engine failed mid-batch: every unfinished job learns why
            for job in ready:
                if job not in done:
                    emit(job, JobEvent(error=f"{type(exc).__name__}: {exc}", error_kind="internal"))
