"""The server under more load than it holds, on a real local Ray: one running row and one queue slot per replica.

Overload is refused at once with 429 and Retry-After (the official client raises RateLimitError), accepted
requests complete, and a streaming client that disconnects frees its row. Run under the offline wrapper.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from live_server import tiny_server

pytestmark = pytest.mark.ray

LONG = 400  # tokens: a request that holds the only row for a while


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Iterator[str]:
    home = tmp_path_factory.mktemp("carve-home")
    with tiny_server(home, tiny_model_dir, tiny_adapters["alpha"], num_cpus=2, engine_num_cpus=0, max_batch_size=1, max_waiting=1, max_tokens_cap=480) as url:
        yield url


def long_body(model: str = "alpha", **extra: object) -> dict[str, object]:
    return {"model": model, "prompt": "The patient was", "max_tokens": LONG, "ignore_eos": True, "temperature": 0, **extra}


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}\S* (\S+)$", text, re.M))


def test_overload_is_refused_at_once_with_retry_after_and_accepted_requests_complete(server):
    import openai

    with httpx.Client(base_url=server, timeout=120) as client, ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: client.post("/v1/completions", json=long_body()), range(6)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses  # one running, one waiting, the rest refused
    for reply in replies:
        if reply.status_code == 200:
            assert reply.json()["usage"]["completion_tokens"] == LONG
        else:
            assert int(reply.headers["Retry-After"]) >= 1
            assert reply.json()["error"]["code"] == "engine_overloaded" and "at capacity" in reply.json()["error"]["message"]

    sdk = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: _sdk_complete(sdk), range(4)))
    assert "RateLimitError" in outcomes and outcomes.count("ok") >= 2, outcomes
    assert metric(server, r'carve_requests_total\{endpoint="completions",status="429"') >= 2
    assert metric(server, "carve_queue_seconds_count") >= 2 and metric(server, "carve_inter_token_latency_seconds_count") >= LONG
    assert metric(server, r'carve_adapter_requests_total\{adapter="alpha@v1"') >= 4


def _sdk_complete(sdk) -> str:
    import openai

    try:
        sdk.completions.create(model="alpha", prompt="Revenue rose", max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True})
    except openai.RateLimitError:
        return "RateLimitError"
    return "ok"


def test_a_streaming_client_that_disconnects_frees_its_row(server):
    steps_before = metric(server, "carve_engine_decode_steps")
    with httpx.Client(base_url=server, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=long_body(stream=True)) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            chunks = [next(lines) for _ in range(6)]  # a few tokens, then the client goes away
            assert any(line.startswith("data: ") for line in chunks)
        # the only row is free again: the next request runs at once, and the engine decoded far fewer than LONG steps
        reply = client.post("/v1/completions", json=long_body(max_tokens=5))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
    assert metric(server, "carve_engine_cancelled_jobs") >= 1
    assert metric(server, "carve_engine_decode_steps") - steps_before < LONG


def test_a_prompt_start_seen_before_is_copied_from_the_prefix_cache_with_the_same_answer(server):
    """The replica keeps each prompt it ran; the next request starting the same way copies that start (the gauge counts it)."""
    system = "You answer questions on clinical notes briefly and exactly, citing the note. " * 3
    with httpx.Client(base_url=server, timeout=120) as client:
        def ask(question: str) -> str:
            reply = client.post("/v1/completions", json={"model": "alpha", "prompt": system + question, "max_tokens": 8, "temperature": 0})
            assert reply.status_code == 200
            return reply.json()["choices"][0]["text"]

        first = ask("Which drug was given?")
        before = metric(server, "carve_engine_prefix_cache_tokens")
        assert ask("Which drug was given?") == first
        after_repeat = metric(server, "carve_engine_prefix_cache_tokens")
        ask("What was the dose?")
    assert after_repeat > before and metric(server, "carve_engine_prefix_cache_tokens") > after_repeat
