"""The shared progress display: resumed items count as done but not toward the rate."""

from __future__ import annotations

import time

from carve.common.progress import stage


def test_resumed_items_are_done_but_not_in_the_rate(capsys) -> None:  # type: ignore[no-untyped-def]
    with stage("responses", 100, "responses") as progress:
        progress.resumed(90)
        time.sleep(0.2)
        progress.advance(2)
        assert progress.done == 92
        assert 2 <= progress.rate <= 11  # 2 items in ~0.2 s, not 92
        eta = progress.eta_s()
        assert eta is not None and 0.5 < eta < 5
    assert "92/100 responses" in capsys.readouterr().err


def test_resumed_midway_keeps_the_rate_of_fresh_items() -> None:
    """An evaluation finds journaled answers task by task: the clock is not restarted, the rate not inflated."""
    with stage("eval", 100, "answers") as progress:
        time.sleep(0.2)
        progress.advance(2)
        progress.resumed(50)  # the next task was already answered
        assert progress.done == 52
        assert 2 <= progress.rate <= 11  # 2 fresh items in ~0.2 s, not 2 in a clock restarted now
