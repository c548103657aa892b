"""Continuous batching for one engine replica: a loop that admits, prefills and decodes per step.

One thread owns the engine (an EngineThread: in a server, the one that also
loaded it, so that the process keeps one OpenMP pool). Callers
:meth:`Scheduler.submit` jobs from any thread and receive their events through
a callback; at every decoding step the loop

1. drops the jobs whose callers went away,
2. admits waiting jobs, oldest first, while the running batch has room for
   their rows: their adapters are acquired (never evicting one a running job
   decodes with; when every held adapter is in use the job waits for a row to
   finish), prompts that need logprobs are scored, and the rest join the
   running batch's prefill (carve.engine.session),
3. decodes one token for every running row, retires the finished at once,
   and in the same forward pass reads the next chunk of an admitted prompt
   within the step's token budget (the weights are read once for both), so
   running rows keep streaming while a long prompt is read; with a step-time
   target (``Limits.max_step_s``) the chunk is also cut to what fits beside
   the rows in that time, by the forward cost the loop measures
   (Sarathi-Serve's token budget from the inter-token SLO, measured live
   rather than profiled once).

Jobs decode the same tokens as alone (the session's guarantee). A full queue
refuses new jobs at once (QueueFull, with a retry hint); an accepted job always
receives exactly one final event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from carve.engine.adapter_cache import AdapterCache, AdapterLoadError, CacheFull
from carve.engine.batching import EngineLoad, Job, JobEvent, job_event, job_request, job_spec, prompt_events, with_first
from carve.engine.engine_thread import EngineThread
from carve.engine.requests import EngineError
from carve.engine.scoring import AdapterSpec, branches_of

logger = logging.getLogger(__name__)

JobEmit = Callable[[JobEvent], None]
_RECENT = 0.1  # weight of the newest step in the running means


@dataclass(frozen=True)
class Limits:
    """How much one replica takes on: rows decoding at once, tokens run per step, jobs queued."""

    max_running: int = 32  # sequences (KV rows; a mixture job has one per branch)
    max_step_tokens: int = 512  # decoded rows plus prefill tokens per step; a prompt longer than the rest is read in chunks
    max_waiting: int = 128  # jobs queued for admission; more are refused (HTTP 429)
    max_step_s: Optional[float] = None  # inter-token target while rows decode: prefill chunks cut to fit beside the decode (None: tokens only)
    min_prefill_tokens: int = 16  # prefill tokens a step runs at least, whatever the target (a prompt always progresses)
    nice: int = 0  # nice increment of a loop thread the scheduler makes itself (and its torch workers): the engine yields the CPU to light work

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_step_tokens < 1 or self.max_waiting < 0 or self.min_prefill_tokens < 1:
            raise ValueError(f"limits must be positive: {self}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in 0..19: {self.nice}")
        if self.max_step_s is not None and self.max_step_s <= 0:
            raise ValueError(f"max_step_s must be positive: {self.max_step_s}")


class ForwardCost:
    """A forward pass's time as ``fixed + per_token * tokens``, fitted to the passes seen (recent ones weigh more).

    Decode steps (a token per row) and prefill chunks (many per row) are both
    observed: a forward costs by the tokens it runs, plus a cost of its own
    whatever its width (every layer launched once), so time per token alone
    would overrate small chunks and keep shrinking them.
    """

    def __init__(self) -> None:
        self.n = self.t = self.nn = self.nt = 0.0  # running means of tokens, seconds and their products

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            for name, value in (("n", tokens), ("t", seconds), ("nn", tokens * tokens), ("nt", tokens * seconds)):
                setattr(self, name, _mean(getattr(self, name), value))

    def line(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token); (0, 0) before any pass was timed."""
        if self.n <= 0:
            return 0.0, 0.0
        spread = self.nn - self.n * self.n
        if spread <= 1e-9 * self.nn:  # every pass the same width: no slope to fit, all of it per token
            return 0.0, self.t / self.n
        per_token = (self.nt - self.n * self.t) / spread
        if per_token <= 0:
            return 0.0, self.t / self.n
        return max(0.0, self.t - per_token * self.n), per_token


def prefill_budget(limits: Limits, rows: int, cost: tuple[float, float]) -> int:
    """Prompt tokens one step may run in the pass that decodes ``rows`` rows.

    The token budget leaves the decoded rows their share (at least a quarter
    for prompts). With a step-time target and rows waiting on this step, the
    chunk is also cut to what the forward ``cost`` line (fixed, per token)
    says fits in ``max_step_s`` beside the rows, but never below
    ``min_prefill_tokens``. Nothing decoding (or no cost measured yet): the
    token budget alone.
    """
    budget = max(limits.max_step_tokens - rows, limits.max_step_tokens // 4)
    fixed, per_token = cost
    if limits.max_step_s is None or rows == 0 or per_token <= 0:
        return budget
    fits = int((limits.max_step_s - fixed) / per_token) - rows
    return max(min(limits.min_prefill_tokens, budget), min(budget, fits))


def _mean(mean: float, value: float) -> float:
    """A running mean leaning on recent steps (the first value taken as it is)."""
    return value if mean == 0 else (1 - _RECENT) * mean + _RECENT * value


class QueueFull(RuntimeError):
    """The replica's queue is full: try again later (``retry_after_s``), here or on another replica."""

    def __init__(self, waiting: int, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"the engine replica is at capacity ({waiting} requests waiting); retry in {retry_after_s:.0f} s")


@dataclass(eq=False)
class Ticket:
    """One submitted job's place in the scheduler."""

    job: Job
    emit: JobEmit
    submitted: float = field(default_factory=time.monotonic)
    session_id: Optional[int] = None
    keys: set[str] = field(default_factory=set)  # adapter keys it decodes with: pinned in the cache while it runs
    names: set[str] = field(default_factory=set)  # their engine names (merges included)
    first: JobEvent = field(default_factory=JobEvent)  # what its first event reports (loads, evictions, queue time)
    needs_idle: bool = False  # its adapter changes the engine's forward path: admitted once nothing else decodes
    cancelled: bool = False

    def rows(self) -> int:
        return max(1, len(self.job.mixture)) if self.job.space != "weights" else 1


class _Wait(Exception):
    """The job at the head of the queue cannot be admitted yet (its adapters need rows to finish)."""


class _Failed(Exception):
    """The job cannot run here; its caller has been sent the error."""


class Scheduler:
    """The engine's loop; ``submit`` and ``cancel`` are thread-safe."""

    def __init__(self, engine: Any, cache: AdapterCache, limits: Limits = Limits(), replica: str = "engine", thread: Optional[EngineThread] = None):
        """``thread``: the engine's own thread (carve.engine.engine_thread), which the loop then occupies until :meth:`close`
        (its priority is its maker's choice); None: a thread of the scheduler's own, at ``limits.nice``."""
        self.engine = engine
        self.cache = cache
        self.limits = limits
        self.replica = replica
        self._own_thread = thread is None
        self._thread = thread if thread is not None else EngineThread(f"carve-scheduler-{replica}", nice=limits.nice)
        self.session = self._thread.run(engine.session)
        self._waiting: deque[Ticket] = deque()
        self._live: dict[int, Ticket] = {}  # session id -> ticket
        self._cancelled: list[Ticket] = []
        self._cond = threading.Condition()
        self._closed = False
        self._rows_held = 0  # rows decoding or being prefilled, as of the loop's last step
        self.steps = 0
        self.cancelled = 0
        self.step_s = 0.0
        self.step_tokens = 0.0
        self.job_s = 1.0  # running mean of admission-to-finish time (retry hints)
        self.forward_cost = ForwardCost()
        self._running = self._thread.submit(self._loop)
        self._running.add_done_callback(self._report_end)

    # -- callers' side ---------------------------------------------------------

    def submit(self, job: Job, emit: JobEmit) -> Ticket:
        """Queue ``job``; its events go to ``emit`` (from the scheduler's thread). QueueFull when the queue is full."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            free_rows = max(0, self.limits.max_running - self._rows_held)  # a job about to be admitted is not waiting
            if len(self._waiting) >= self.limits.max_waiting + free_rows:
                raise QueueFull(len(self._waiting), self._retry_after())
            ticket = Ticket(job, emit)
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The caller went away: the job leaves the queue or the batch at the next step."""
        with self._cond:
            if not ticket.cancelled:
                ticket.cancelled = True
                self._cancelled.append(ticket)
                self._cond.notify()

    @property
    def alive(self) -> bool:
        return not self._running.done()

    @property
    def failure(self) -> Optional[BaseException]:
        """What ended the loop, when something outside its per-step guard did (None: running, or closed)."""
        return self._running.exception() if self._running.done() else None

    def _report_end(self, ended: "futures.Future[None]") -> None:
        """A loop that died says why (its thread's own handler never sees the exception of queued work)."""
        if ended.exception() is not None:
            logger.error("the scheduler loop of %s stopped", self.replica, exc_info=ended.exception())

    def load(self) -> EngineLoad:
        with self._cond:
            waiting = len(self._waiting)
        kept = self.engine.prefix_cache
        return EngineLoad(
            self.replica, self.session.rows, waiting, self.step_s, self.step_tokens, self.steps, self.cancelled, kept.reused_tokens if kept is not None else 0,
            self.engine.drafted_tokens, self.engine.accepted_draft_tokens,
        )

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; jobs not finished get an error event."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        futures.wait([self._running], timeout)
        if self._own_thread:
            self._thread.shutdown()

    def _retry_after(self) -> float:
        backlog = (len(self._waiting) + 1) / self.limits.max_running
        return float(min(60, max(1, round(backlog * self.job_s))))

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._cancelled or not self.session.idle):
                    self._cond.wait()
                if self._closed:
                    break
                cancelled, self._cancelled = self._cancelled, []
            try:
                for ticket in cancelled:
                    self._drop(ticket)
                started = time.perf_counter()
                tokens = self._admit()
                budget = prefill_budget(self.limits, self.session.rows, self.forward_cost.line()) if self.session.prefilling else 0
                if budget and not self.session.rows:  # nothing decoding: prompts alone, as many as the budget holds
                    prefill_started = time.perf_counter()
                    prefilled = self.session.prefill(budget)
                    self.forward_cost.observe(prefilled, time.perf_counter() - prefill_started)
                    tokens += prefilled
                    budget = 0
                rows, step_started = self.session.rows, time.perf_counter()
                events = self.session.step(prefill_budget=budget)  # decoded rows and a prompt chunk in one pass
                if events:
                    self.forward_cost.observe(rows + self.session.drafted + self.session.prefilled, time.perf_counter() - step_started)
                tokens += len(events) + self.session.prefilled
                if tokens:
                    self._record_step(time.perf_counter() - started, tokens)
                self._dispatch(events)
            except Exception as exc:  # the engine failed: every job it held learns why; the next step starts clean
                self._fail_running(f"{type(exc).__name__}: {exc}")
            with self._cond:
                self._rows_held = self.session.rows + self.session.prefilling_rows
        with self._cond:
            left, self._waiting = list(self._waiting), deque()
        for ticket in [*left, *self._live.values()]:
            self._send(ticket, JobEvent(error="the engine replica is shutting down", error_kind="internal"))
        self._live.clear()

    def _record_step(self, seconds: float, tokens: int) -> None:
        self.steps += 1
        self.step_s = _mean(self.step_s, seconds)
        self.step_tokens = _mean(self.step_tokens, tokens)

    # -- admission -----------------------------------------------------------------

    def _admit(self) -> int:
        """Admit waiting jobs while rows are free; returns prompt tokens scored (prefill is counted by the session)."""
        room = self.limits.max_running - self.session.rows - self.session.prefilling_rows
        admitted: list[tuple[Ticket, AdapterSpec]] = []
        while True:
            with self._cond:
                if not self._waiting:
                    break
                ticket = self._waiting[0]
                if ticket.cancelled:
                    self._waiting.popleft()
                    continue
            busy = bool(admitted) or not self.session.idle
            if busy and ticket.rows() > room:
                break
            if ticket.needs_idle and busy:
                break
            try:
                spec = self._prepare(ticket, admitted)
            except _Wait:
                break
            except _Failed:
                with self._cond:
                    self._waiting.popleft()
                continue
            with self._cond:
                self._waiting.popleft()
            ticket.first.queue_s = time.monotonic() - ticket.submitted
            admitted.append((ticket, spec))
            room -= ticket.rows()
        return self._start(admitted) if admitted else 0

    def _pinned(self, admitted: list[tuple[Ticket, AdapterSpec]]) -> tuple[set[str], set[str]]:
        """Adapter keys and engine names of every job decoding or being admitted: not to be evicted."""
        tickets = [*self._live.values(), *(t for t, _ in admitted)]
        return {k for t in tickets for k in t.keys}, {n for t in tickets for n in t.names}

    def _prepare(self, ticket: Ticket, admitted: list[tuple[Ticket, AdapterSpec]]) -> AdapterSpec:
        """Acquire the job's adapters and build what it decodes under. _Wait: not yet; _Failed: never (error emitted)."""
        job = ticket.job
        pinned_keys, pinned_names = self._pinned(admitted)
        busy = bool(pinned_keys) or not self.session.idle
        names: dict[str, str] = {}
        for ref in job.refs():
            try:
                got = self.cache.acquire(ref, pinned=pinned_keys | names.keys())
            except CacheFull:
                if busy:
                    raise _Wait from None
                self._fail(ticket, f"the request needs {len(job.refs())} adapters at once; this replica holds at most {self.cache.capacity}", "adapter_load")
                raise _Failed from None
            except AdapterLoadError as exc:
                self._fail(ticket, str(exc), "adapter_load")
                raise _Failed from None
            names[ref.key] = got.engine_name
            if got.loaded:
                ticket.first.loaded.append(ref.key)
                ticket.first.evicted += got.evicted
                if busy and not self.session.accepts_path():  # this adapter needs another forward path: wait for an idle batch
                    self.cache.drop(ref.key)
                    ticket.first.loaded.remove(ref.key)
                    ticket.needs_idle = True
                    raise _Wait
        try:
            spec = job_spec(job, names, self.cache, pinned=pinned_names)
        except CacheFull:
            raise _Wait from None
        except Exception as exc:  # a weight-space merge that failed: this job only
            self._fail(ticket, f"mixture could not be built: {type(exc).__name__}: {exc}", "internal")
            raise _Failed from None
        ticket.keys = set(names)
        ticket.names = {name for name, _ in branches_of(spec) if name is not None}
        return spec

    def _start(self, admitted: list[tuple[Ticket, AdapterSpec]]) -> int:
        """Score the prompts that ask for logprobs (one call), then let the generating jobs join the batch (one prefill group)."""
        scored_tokens = 0
        scoring = [(t, s) for t, s in admitted if t.job.prompt_logprobs is not None]
        if scoring:
            try:
                events = prompt_events(self.engine, [t.job for t, _ in scoring], [s for _, s in scoring])
            except Exception as exc:
                for ticket, _ in scoring:
                    self._fail(ticket, f"{type(exc).__name__}: {exc}", "internal")
                admitted = [(t, s) for t, s in admitted if t.job.prompt_logprobs is None]
            else:
                for (ticket, _), event in zip(scoring, events):
                    self._send(ticket, with_first(ticket.first, event))
                    ticket.first = JobEvent()
                    scored_tokens += ticket.job.prompt_tokens
        generating = [(t, s) for t, s in admitted if t.job.max_new_tokens > 0]
        try:
            self._join(generating)
        except EngineError:  # the session refused the group, admitting none: each alone, the refused ones fail
            for pair in generating:
                try:
                    self._join([pair])
                except EngineError as exc:
                    self._fail(pair[0], str(exc), "internal")
        return scored_tokens

    def _join(self, group: list[tuple[Ticket, AdapterSpec]]) -> None:
        """The jobs join the running batch as one prefill group (their shared prompt prefix read once)."""
        ids = self.session.admit([job_request(t.job, s) for t, s in group])
        for (ticket, _), session_id in zip(group, ids):
            ticket.session_id = session_id
            self._live[session_id] = ticket

    # -- events ------------------------------------------------------------------------

    def _dispatch(self, events: list[Any]) -> None:
        for event in events:
            ticket = self._live.get(event.index)
            if ticket is None:
                continue
            out = with_first(ticket.first, job_event(ticket.job, event))
            ticket.first = JobEvent()
            if out.finish_reason:
                del self._live[event.index]
                started = ticket.submitted + (out.queue_s or 0.0)
                self.job_s = _mean(self.job_s, time.monotonic() - started)
                out.load = self.load()
            self._send(ticket, out)

    def _drop(self, ticket: Ticket) -> None:
        """A cancelled job leaves: out of the queue, or out of the batch."""
        with self._cond:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
        if ticket.session_id is not None and self._live.pop(ticket.session_id, None) is not None:
            self.session.cancel(ticket.session_id)
        self.cancelled += 1
        self._send(ticket, JobEvent(error="cancelled: the caller went away", error_kind="cancelled"))

    def _fail(self, ticket: Ticket, why: str, kind: str) -> None:
        self._send(ticket, with_first(ticket.first, JobEvent(error=why, error_kind=kind, prompt_tokens=ticket.job.prompt_tokens)))

    @staticmethod
    def _send(ticket: Ticket, event: JobEvent) -> None:
        """Hand an event to the job's caller; a caller whose callback fails loses its own events, nobody else's."""
        try:
            ticket.emit(event)
        except Exception:  # noqa: BLE001  (e.g. its event loop closed)
            ticket.cancelled = True

    def _fail_running(self, why: str) -> None:
        for ticket in self._live.values():
            self._fail(ticket, why, "internal")
        self._live.clear()
        self.session = self.engine.session()
