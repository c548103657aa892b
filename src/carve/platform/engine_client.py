"""Gateway calls into the engine replicas that survive the death of one replica.

A replica killed mid-request (its process SIGKILLed, its node lost) reaches the
gateway as one of Ray's actor, worker or node errors; Serve has by then marked
it dead and routes the next call to a live replica. A non-streamed job shows
the client nothing until it ends, so it is simply sent again (``retries`` times
at most, after a short backoff). A stream is re-opened only until its first
event arrives: after that the client has seen tokens that a retry would repeat,
so a stream cut later ends with an error event instead. Only the requests a
dead replica held are affected; every other request never sees it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

from carve.platform.requests import ApiError

T = TypeVar("T")
RETRIES = 2
BACKOFF_S = 0.5


def _lost_types() -> tuple[type[BaseException], ...]:
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    return (
        ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        ray_errors.OwnerDiedError,
        ray_errors.LocalRayletDiedError,
        serve_errors.ReplicaUnavailableError,
        serve_errors.DeploymentUnavailableError,
    )


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica (or its node) went away, rather than that the job itself failed."""
    return isinstance(exc, _lost_types())


def lost_error(exc: BaseException) -> ApiError:
    """What the client hears when the retries ran out: a 503 it may retry, never a bare 500."""
    return ApiError(
        503, f"the engine replica serving this request went away ({type(exc).__name__}); retry it", kind="server_error",
        code="replica_lost", headers={"Retry-After": "1"},
    )


class Admission:
    """Inference requests this gateway has in progress, refused at once past what the engine replicas can hold.

    The replicas' own queues stay the authority (each refuses what it cannot
    hold); this is the gateway's fast path: in a burst beyond ``capacity``
    (replicas x (rows + queue)) the excess gets its 429 before its body is
    parsed, routed or tokenized, so a refusal costs milliseconds rather than
    the backlog's tokenization. Used from the gateway's event loop only.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0

    def enter(self) -> Callable[[], None]:
        """Take a place (ApiError 429 when none is left); returns its release, which frees it once however often called."""
        if self.held >= self.capacity:
            raise ApiError(
                429, f"the server is at capacity ({self.held} requests in progress); retry shortly", kind="server_overloaded",
                code="engine_overloaded", headers={"Retry-After": "1"},
            )
        self.held += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held -= 1

        return release


@dataclass
class RetryPolicy:
    retries: int = RETRIES
    backoff_s: float = BACKOFF_S
    on_retry: Optional[Callable[[BaseException], None]] = None  # e.g. a metric

    async def _wait(self, attempt: int, exc: BaseException) -> None:
        if self.on_retry is not None:
            self.on_retry(exc)
        await asyncio.sleep(self.backoff_s * (attempt + 1))


async def call_with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
    """``call()`` again after a lost replica, up to ``policy.retries`` times; then the 503 of :func:`lost_error`."""
    for attempt in range(policy.retries + 1):
        try:
            return await call()
        except Exception as exc:
            if not replica_lost(exc):
                raise
            if attempt == policy.retries:
                raise lost_error(exc) from exc
            await policy._wait(attempt, exc)
    raise AssertionError("unreachable")


async def open_stream(start: Callable[[], Any], policy: RetryPolicy) -> tuple[Any, Any]:
    """A stream started with ``start()`` and its first event; restarted while no event came, as a lost replica held it.

    Returns ``(first event, the stream)``; the caller reads the rest from the stream.
    """

    async def first_event() -> tuple[Any, Any]:
        events = start()
        try:
            return await events.__anext__(), events
        except BaseException:
            events.cancel()
            raise

    return await call_with_retries(first_event, policy)


async def next_event(events: AsyncIterator[T]) -> T:
    """The stream's next event; a replica lost mid-stream is the 503 of :func:`lost_error` (the caller ends the stream with it)."""
    try:
        return await events.__anext__()
    except Exception as exc:
        if replica_lost(exc):
            raise lost_error(exc) from exc
        raise
