"""One OS thread for all of an engine's torch work, in a process that serves requests from other threads.

torch's CPU build runs its parallel regions on libgomp (GNU OpenMP), which
keeps a pool of worker threads for each thread that starts a region. When the
pools together hold more threads than the machine has cores, libgomp stops
spinning between regions and parks its workers in the kernel, so every one of
a decode step's few hundred small products and element-wise calls pays a
wake-up. An engine replica that loaded the model on one thread and decoded on
another held two pools: on this 2-core machine its decode step took 1.7-2x the
time of the same engine on one thread (docs/results, session 21).

An :class:`EngineThread` is the one thread that loads, prepares and decodes:
callers hand it work with :meth:`run` (wait for the result) or :meth:`submit`.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")
_Work = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class EngineThread:
    """A single daemon worker thread, at ``nice`` below the process's priority, with ``torch_threads`` threads in its torch pool.

    Daemon, as the scheduler's loop thread was: a process that exits while a
    loop still runs on it is not held up by it.
    """

    def __init__(self, name: str = "carve-engine", torch_threads: Optional[int] = None, nice: int = 0):
        self._work: "queue.SimpleQueue[_Work | None]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.run(lower_thread_priority, nice)  # first, so the torch workers this thread starts inherit it
        if torch_threads:
            self.run(_set_torch_threads, torch_threads)

    @property
    def ident(self) -> int:
        """The thread's identifier (``threading.get_ident()`` on it)."""
        return int(self._thread.ident)  # type: ignore[arg-type]  (set once started)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        """``fn(*args, **kwargs)`` queued on the thread (after the work already queued, a scheduler's loop included)."""
        future: "Future[T]" = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the thread; its result, or its exception raised here."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        """No more work; what is queued still runs (a running loop must be told to stop first)."""
        self._work.put(None)

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args, kwargs = work
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001  (handed to the caller, who raises it)
                future.set_exception(exc)
            del work, future, fn, args, kwargs  # a finished loop or batch (engine, tensors) not held until the next item


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by ``increment`` (Linux: per thread; threads it starts inherit it).

    On a machine whose cores the engine fills, the HTTP proxy and gateway that
    carry its tokens out (and answer 429s) wait behind its steps; a lower
    priority lets them run first, at no cost to the engine when they are idle.
    Torch's worker threads for this thread's parallel regions are started by it,
    so they inherit the value. Silently skipped where the OS refuses or lacks it.
    """
    if increment <= 0:
        return
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + increment)
    except (AttributeError, OSError):
        pass


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
