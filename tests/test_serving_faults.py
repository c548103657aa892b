"""A killed engine replica costs only the requests it held: Ray's errors retried or answered, never a 500 or a hang.

The first tests drive carve.platform.engine_client with Ray's own error types; the last kills (SIGKILL) one
of two engine replicas of a real local Serve app under load. Run under the offline wrapper.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from live_server import tiny_server
from ray import exceptions as ray_errors

from carve.platform.engine_client import RetryPolicy, call_with_retries, next_event, open_stream, replica_lost
from carve.platform.requests import ApiError

FAST = RetryPolicy(retries=2, backoff_s=0.01)


class Flaky:
    """An engine call that fails with ``errors`` (in turn) before it answers."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "result"


class Stream:
    """A stream whose first event fails with ``error`` (when given), as a stream on a dead replica does."""

    def __init__(self, error: BaseException | None, events: list[str]):
        self.error, self.events, self.cancelled = error, list(events), False

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> str:
        if self.error is not None:
            raise self.error
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


def test_lost_replicas_are_told_apart_from_failed_jobs() -> None:
    assert all(replica_lost(e) for e in (ray_errors.ActorDiedError(), ray_errors.WorkerCrashedError(), ray_errors.NodeDiedError("n")))
    assert not any(replica_lost(e) for e in (ValueError("bad"), ray_errors.TaskCancelledError(), ray_errors.GetTimeoutError()))


def test_a_job_is_sent_again_after_a_lost_replica_and_other_errors_are_not_retried() -> None:
    seen: list[str] = []
    policy = RetryPolicy(retries=2, backoff_s=0.01, on_retry=lambda e: seen.append(type(e).__name__))
    flaky = Flaky(ray_errors.ActorDiedError(), ray_errors.WorkerCrashedError())
    assert asyncio.run(call_with_retries(flaky, policy)) == "result" and flaky.calls == 3
    assert seen == ["ActorDiedError", "WorkerCrashedError"]

    hopeless = Flaky(*[ray_errors.ActorDiedError()] * 3)
    with pytest.raises(ApiError) as err:
        asyncio.run(call_with_retries(hopeless, FAST))
    assert (err.value.status, err.value.code, err.value.headers["Retry-After"]) == (503, "replica_lost", "1") and hopeless.calls == 3

    broken = Flaky(ValueError("the job's own error"))
    with pytest.raises(ValueError):
        asyncio.run(call_with_retries(broken, FAST))
    assert broken.calls == 1


def test_a_stream_is_reopened_until_its_first_event_then_ends_with_an_error() -> None:
    opened: list[Stream] = []

    def start() -> Stream:
        opened.append(Stream(ray_errors.ActorDiedError() if not opened else None, ["first", "second"]))
        return opened[-1]

    first, events = asyncio.run(open_stream(start, FAST))
    assert first == "first" and len(opened) == 2 and opened[0].cancelled and events is opened[1]

    cut = Stream(ray_errors.ActorDiedError(), [])
    with pytest.raises(ApiError) as err:
        asyncio.run(next_event(cut))
    assert err.value.code == "replica_lost"
    with pytest.raises(StopAsyncIteration):
        asyncio.run(next_event(Stream(None, [])))


# -- a real replica killed under load ----------------------------------------------------------

LONG = 300


def engine_replica_pids() -> dict[str, int]:
    """Replica actor id -> worker PID of every live engine replica, from the GCS actor table (no dashboard needed)."""
    from ray._private import state

    return {
        actor_id: info["Pid"]
        for actor_id, info in state.actors().items()
        if info.get("ActorClassName", "").endswith(":CarveEngine") and info.get("State") == "ALIVE" and info.get("Pid")
    }


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Iterator[str]:
    home = tmp_path_factory.mktemp("carve-home")
    settings = dict(num_cpus=2, engine_num_cpus=0, replicas=2, max_batch_size=2, max_waiting=64, max_tokens_cap=480)
    with tiny_server(home, tiny_model_dir, tiny_adapters["alpha"], **settings) as url:
        yield url


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "alpha", "prompt": "The patient was", "max_tokens": LONG, "ignore_eos": True, "temperature": 0, **extra}


def read_stream(client: httpx.Client) -> dict[str, Any]:
    """A streamed completion read to its end: tokens seen, finish reason, an error event if one came."""
    out: dict[str, Any] = {"chunks": 0, "finish": None, "error": None, "done": False}
    with client.stream("POST", "/v1/completions", json=body(stream=True)) as reply:
        out["status"] = reply.status_code
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]["code"]
                continue
            out["chunks"] += 1
            out["finish"] = event["choices"][0].get("finish_reason") or out["finish"]
    return out


@pytest.mark.ray
def test_a_killed_replica_costs_only_the_streams_it_held(two_replicas: str) -> None:
    with httpx.Client(base_url=two_replicas, timeout=120) as client:
        assert client.post("/v1/completions", json=body(max_tokens=4)).status_code == 200
        pids = engine_replica_pids()
        assert len(pids) == 2, pids
        victim = sorted(pids.values())[0]
        killed = threading.Event()

        def kill_soon() -> None:
            time.sleep(1.0)  # every request below is running or queued by then
            os.kill(victim, signal.SIGKILL)
            killed.set()

        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            threading.Thread(target=kill_soon, daemon=True).start()
            plain = [pool.submit(client.post, "/v1/completions", json=body()) for _ in range(6)]
            streams = [pool.submit(read_stream, client) for _ in range(4)]
            replies = [f.result(timeout=300) for f in plain]
            streamed = [f.result(timeout=300) for f in streams]
        assert killed.is_set()
        # non-streamed requests are sent again on the other replica: all complete in full
        assert [r.status_code for r in replies] == [200] * 6, [r.text[:200] for r in replies]
        assert all(r.json()["usage"]["completion_tokens"] == LONG for r in replies)
        # a stream either completes, or (held by the killed replica, with tokens sent) ends with the replica_lost event
        for s in streamed:
            assert s["status"] == 200 and s["done"], s
            assert (s["finish"] == "length" and s["error"] is None) or s["error"] == "replica_lost", s
        lost = [s for s in streamed if s["error"]]
        assert len(lost) <= 2  # at most the rows (max_batch_size) the killed replica was decoding
        # Serve replaces the replica: two live replicas again, and the server keeps answering
        deadline = time.monotonic() + 120
        while len(engine_replica_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(engine_replica_pids()) == 2 and victim not in engine_replica_pids().values()
        assert client.post("/v1/completions", json=body(max_tokens=4)).status_code == 200
        retries = sum(float(v.split()[-1]) for v in client.get("/metrics").text.splitlines() if v.startswith("carve_replica_retries_total"))
        print(f"recovered in {time.monotonic() - started:.1f} s; {len(lost)} of 4 streams cut, {retries:.0f} engine calls sent again")
