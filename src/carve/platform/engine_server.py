"""The engine replica: the base model loaded once, up to N adapters, mixed-adapter batches.

Continuous batching (the default): the replica's scheduler (carve.engine.scheduler)
owns the engine on the replica's one engine thread (carve.engine.engine_thread),
the thread that also loaded it; a request joins the running batch at
the next decoding step and leaves it when it finishes, or when its caller goes
away. A full queue answers at once with an "overloaded" event (HTTP 429).

Static batching (``batching: static``, kept for comparison): requests enter ONE
``@serve.batch`` queue; each batch is one engine call decoded to its end.

Either way the adapter is part of the job, never Serve's multiplexed model id:
Serve splits batches by that id, which would forbid mixing adapters in a
forward pass. Each job's events reach its caller through a queue, so streaming
and non-streaming requests share the same batches.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from ray import serve

from carve.engine.adapter_cache import AdapterCache
from carve.engine.batching import BatchRunner, Job, JobEvent, JobResult
from carve.engine.drafting import DraftSettings
from carve.engine.engine_thread import EngineThread
from carve.engine.requests import EngineError
from carve.engine.scheduler import Limits, QueueFull, Scheduler
from carve.platform.config import ServeConfig

logger = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "CarveEngine"


@dataclass
class _Pending:
    job: Job
    queue: "asyncio.Queue[JobEvent | None]" = field(default_factory=asyncio.Queue)


def _close_when_done(pending: _Pending) -> Any:
    """A done-callback ending the job's stream even if its batch failed before running."""

    def callback(task: "asyncio.Future[Any]") -> None:
        if not task.cancelled():
            task.exception()  # retrieved here; the consumer reports a missing final event
        pending.queue.put_nowait(None)

    return callback


@serve.deployment(name=ENGINE_DEPLOYMENT, max_ongoing_requests=128, health_check_period_s=10)
class EngineServer:
    """One base model, an LRU of adapters, and a batch queue shared by every adapter."""

    def __init__(self, config: dict[str, Any]):
        self.config = ServeConfig.model_validate(config)
        replica = _replica_name()
        # Every torch call of this replica on one thread: loading, adapters, decoding (carve.engine.engine_thread).
        self.thread = EngineThread(f"carve-engine-{replica}", torch_threads=self.config.engine_threads, nice=self.config.engine_nice)
        self.engine, self.resolved, self.plan = self.thread.run(self._open_engine)
        self.cache = AdapterCache(self.engine, self.config.max_adapters)
        self.scheduler: Optional[Scheduler] = None
        if self.config.batching == "continuous":
            step_s = self.config.max_step_ms / 1000 if self.config.max_step_ms is not None else None
            limits = Limits(self.config.max_batch_size, self.config.max_step_tokens, self.config.max_waiting, max_step_s=step_s)
            self.scheduler = Scheduler(self.engine, self.cache, limits, replica=replica, thread=self.thread)
        self.runner = BatchRunner(self.engine, self.cache)
        self._run_batch.set_max_batch_size(self.config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.config.batch_wait_s)

    def _open_engine(self) -> Any:
        """The engine, its drafting settings and structured output (on the engine thread)."""
        from carve.engine.loading import open_engine

        engine, resolved, plan = open_engine(self.config.model, precision=self.config.precision)
        engine.drafts = DraftSettings(tokens=self.config.draft_tokens, max_rows=self.config.draft_max_rows)
        try:
            engine.prepare_structured_output()
        except EngineError as exc:  # the rest serves; a constrained request fails alone, saying why
            logger.warning("structured output unavailable on this replica: %s", exc)
        return engine, resolved, plan

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def _run_batch(self, pending: list[_Pending]) -> list[None]:
        loop = asyncio.get_running_loop()

        def emit(index: int, event: JobEvent) -> None:  # called from the worker thread
            loop.call_soon_threadsafe(pending[index].queue.put_nowait, event)

        try:
            await asyncio.wrap_future(self.thread.submit(self.runner.run, [p.job for p in pending], emit))
        finally:  # events emitted above are queued before this runs (FIFO callbacks)
            for p in pending:
                p.queue.put_nowait(None)
        return [None] * len(pending)

    async def stream(self, job: Job) -> AsyncIterator[JobEvent]:
        """The job's events as they are decoded; the last one is final."""
        final = False
        async for event in self._scheduled(job) if self.scheduler is not None else self._batched(job):
            final = final or event.final
            yield event
        if not final:  # the engine died without a word for this job
            yield JobEvent(error="the engine stopped before finishing this request", error_kind="internal")

    async def _scheduled(self, job: Job) -> AsyncIterator[JobEvent]:
        """Continuous batching: the job's events from the scheduler; a caller that goes away cancels the job."""
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        try:
            ticket = self.scheduler.submit(job, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except QueueFull as exc:
            yield JobEvent(error=str(exc), error_kind="overloaded", retry_after_s=exc.retry_after_s, prompt_tokens=job.prompt_tokens)
            return
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.final
                yield event
        finally:  # cancelled (client disconnect) or closed early: the row is freed at the next step
            if not finished:
                self.scheduler.cancel(ticket)

    async def _batched(self, job: Job) -> AsyncIterator[JobEvent]:
        """Static batching: the job rides the next ``@serve.batch``."""
        pending = _Pending(job)
        task = asyncio.ensure_future(self._run_batch(pending))
        task.add_done_callback(_close_when_done(pending))
        while (event := await pending.queue.get()) is not None:
            yield event

    async def generate(self, job: Job) -> JobResult:
        """The whole job at once (non-streaming requests)."""
        result = JobResult()
        async for event in self.stream(job):
            result.add(event)
        return result

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request router: which adapters this replica holds, and how busy it is."""
        stats: dict[str, Any] = {"adapters": self.cache.keys(), "capacity": self.cache.capacity}
        if self.scheduler is not None:
            load = self.scheduler.load()
            stats.update(running=load.running, waiting=load.waiting)
        return stats

    def check_health(self) -> None:
        """Polled by Serve: a replica whose scheduler loop died is restarted."""
        if self.scheduler is not None and not self.scheduler.alive:
            failure = self.scheduler.failure
            raise RuntimeError("the engine scheduler loop has stopped" + (f": {type(failure).__name__}: {failure}" if failure else ""))

    def __del__(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()
        if getattr(self, "thread", None) is not None:
            self.thread.shutdown()


def _replica_name() -> str:
    """This replica's id in Serve (the scheduler's name in metrics and thread names)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001  (outside a Serve replica)
        return "engine"
