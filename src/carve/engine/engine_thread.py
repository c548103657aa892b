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

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class EngineThread:
    """A single worker thread; ``torch_threads`` (optional) is set on it first, so its own pool has that many threads."""

    def __init__(self, name: str = "carve-engine", torch_threads: Optional[int] = None):
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident: int = self.run(_thread_ident)
        if torch_threads:
            self.run(_set_torch_threads, torch_threads)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        """``fn(*args, **kwargs)`` queued on the thread (after the work already queued, a scheduler's loop included)."""
        return self._executor.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the thread; its result, or its exception raised here."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        """No more work; what is queued still runs (a running loop must be told to stop first)."""
        self._executor.shutdown(wait=False)


def _thread_ident() -> int:
    import threading

    return threading.get_ident()


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
