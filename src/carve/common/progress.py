"""One progress display for every long stage: stage name, count, rate and time left.

Wraps rich's progress bar so every command shows the same columns, and falls
back to plain periodic lines when the output is not a terminal (CI logs, files).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

# Observers of every stage in this process (a job runner reports them to its job store).
# Called as listener(stage_progress, event) with event "start", "advance" or "end";
# an exception raised by a listener (e.g. a cancellation) propagates into the stage.
Listener = Callable[["StageProgress", str], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` on every stage's start, advance and end while the block runs."""
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


def _notify(progress: "StageProgress", event: str) -> None:
    for listener in list(_listeners):
        listener(progress, event)


class StageProgress:
    """Progress of one stage; call :meth:`advance` as items finish."""

    def __init__(self, stage: str, total: int | None, unit: str = "items", every_s: float = 10.0):
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self.resumed_items = 0  # done by an earlier, interrupted attempt: not part of the rate
        self.started = time.monotonic()
        self._every = every_s
        self._last_print = 0.0
        self._bar = None
        self._task = None

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.resumed_items) / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        if not self.total or self.rate == 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        eta = self.eta_s()
        left = f", {_fmt_s(eta)} left" if eta is not None else ""
        return f"[{self.stage}] {self.done}{total} {self.unit} ({self.rate:.2f}/s{left})"

    def resumed(self, n: int) -> None:
        """Count ``n`` items an earlier attempt finished (shown as done, left out of the rate).

        May be called mid-stage (an evaluation finds each task's journaled
        answers as it reaches the task): the rate stays fresh items over the
        whole elapsed time, never the resumed ones over a restarted clock.
        """
        if n:
            self.resumed_items += n
            if self._bar is not None:  # restart rich's speed estimate from here
                self._bar.reset(self._task, completed=self.done + n)
            self.done += n
            _notify(self, "advance")

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        _notify(self, "advance")
        if self._bar is not None:
            self._bar.update(self._task, advance=n, description=self._describe(note))
        elif time.monotonic() - self._last_print >= self._every or (self.total and self.done >= self.total):
            self._last_print = time.monotonic()
            print(self.line() + (f" {note}" if note else ""), file=sys.stderr, flush=True)

    def _describe(self, note: str | None) -> str:
        return f"{self.stage}" + (f" [dim]{note}[/dim]" if note else "")


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextmanager
def stage(name: str, total: int | None, unit: str = "items") -> Iterator[StageProgress]:
    """Show a progress bar (terminal) or periodic lines (logs) while a stage runs."""
    progress = StageProgress(name, total, unit)
    _notify(progress, "start")
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task):  # type: ignore[no-untyped-def]
                return Text(f"{task.speed or 0:.2f} {unit}/s")

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, transient=False) as bar:
            progress._bar = bar
            progress._task = bar.add_task(name, total=total)
            yield progress
    else:
        yield progress
        print(progress.line() + " done", file=sys.stderr, flush=True)
    _notify(progress, "end")
