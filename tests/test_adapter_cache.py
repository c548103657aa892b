"""The serving adapter cache and batch runner on a real tiny engine (no Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carve.artifact import AdapterRef
from carve.engine.adapter_cache import AdapterCache, AdapterLoadError, CacheFull
from carve.engine.batching import BatchRunner, Job, JobEvent, JobResult, split_by_capacity


@pytest.fixture()
def engine(tiny_model_dir: Path):
    from carve.engine.loading import open_engine

    return open_engine(str(tiny_model_dir))[0]


def ref(name: str, path: Path, version: int = 1) -> AdapterRef:
    return AdapterRef(name, version, str(path))


def broken_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # header length beyond the file
    return target


def test_lru_evicts_least_recently_used(engine, tiny_adapters):
    cache = AdapterCache(engine, capacity=2)
    a, b, c = (ref(n, p) for n, p in tiny_adapters.items())
    assert cache.acquire(a).loaded and cache.acquire(b).loaded
    again = cache.acquire(a)  # a becomes most recent
    assert not again.loaded and again.evicted == []
    got = cache.acquire(c)
    assert got.loaded and got.evicted == [b.key]
    assert cache.keys() == [a.key, c.key]
    assert len(engine.adapters) == 2 and got.engine_name in engine.adapters
    assert (cache.loads, cache.evictions) == (3, 1)


def test_pinned_adapters_are_never_evicted(engine, tiny_adapters):
    cache = AdapterCache(engine, capacity=2)
    a, b, c = (ref(n, p) for n, p in tiny_adapters.items())
    cache.acquire(a)
    cache.acquire(b)
    with pytest.raises(CacheFull):
        cache.acquire(c, pinned={a.key, b.key})
    assert cache.keys() == [a.key, b.key]
    assert cache.acquire(c, pinned={b.key}).evicted == [a.key]


def test_new_version_is_a_new_adapter(engine, tiny_adapters):
    cache = AdapterCache(engine, capacity=4)
    v1, v2 = ref("alpha", tiny_adapters["alpha"], 1), ref("alpha", tiny_adapters["beta"], 2)
    n1, n2 = cache.acquire(v1).engine_name, cache.acquire(v2).engine_name
    assert n1 != n2 and cache.keys() == ["alpha@v1", "alpha@v2"]


def test_broken_adapter_fails_alone_and_changes_nothing(engine, tiny_adapters, tmp_path):
    cache = AdapterCache(engine, capacity=2)
    good = ref("alpha", tiny_adapters["alpha"])
    cache.acquire(good)
    bad = ref("broken", broken_copy(tiny_adapters["beta"], tmp_path / "broken"))
    with pytest.raises(AdapterLoadError, match="broken@v1 could not be loaded.*safetensors"):
        cache.acquire(bad)
    assert cache.keys() == [good.key] and len(engine.adapters) == 1


def test_split_by_capacity_keeps_order_and_limits_distinct_adapters(tiny_adapters):
    refs = [ref(n, p) for n, p in tiny_adapters.items()]
    jobs = [Job("x", 1, r, 4) for r in (refs[0], None, refs[1], refs[0], refs[2], None, refs[1])]
    assert split_by_capacity(jobs, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert split_by_capacity(jobs, 3) == [list(range(7))]
    assert split_by_capacity(jobs, 1) == [[0, 1], [2], [3], [4, 5], [6]]
    mix = Job("x", 1, None, 4, mixture=((refs[0], 0.5), (refs[1], 0.5)))  # a mixture needs all its adapters in one group
    assert split_by_capacity([jobs[4], mix, jobs[1], jobs[0]], 2) == [[0], [1, 2, 3]]
    assert split_by_capacity([jobs[1], mix, jobs[4]], 1) == [[0, 1], [2]]  # over capacity: no other adapter joins it


def run(runner: BatchRunner, jobs: list[Job]) -> tuple[list[JobResult], list[list[JobEvent]]]:
    events: list[list[JobEvent]] = [[] for _ in jobs]
    runner.run(jobs, lambda i, event: events[i].append(event))
    results = []
    for stream in events:
        result = JobResult()
        for event in stream:
            result.add(event)
        results.append(result)
    return results, events


def test_mixed_adapter_batch_equals_direct_engine_runs(engine, reference, tiny_adapters):
    from carve.engine.decoding import GenerationRequest, Sampling

    names = list(tiny_adapters)
    prompts = ["The patient was", "Revenue rose", "Gene expression", "Question: Is", "The company said", "### Instruction:"]
    adapters = [names[0], None, names[1], names[2], names[0], names[1]]
    jobs = [Job(p, 1, ref(a, tiny_adapters[a]) if a else None, 12, stop=("Answer",) if i == 3 else ()) for i, (p, a) in enumerate(zip(prompts, adapters))]
    cache = AdapterCache(engine, capacity=2)  # three adapters: the runner must split the batch
    results, events = run(BatchRunner(engine, cache), jobs)
    expected = reference.generate([GenerationRequest.single(j.prompt, a, Sampling(12, stop=j.stop)) for j, a in zip(jobs, adapters)])
    for got, want, stream in zip(results, expected, events):
        assert got.error is None
        assert got.text == want.text
        assert got.completion_tokens == len(want.token_ids)
        assert got.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[want.finish_reason]
        assert sum(e.final for e in stream) == 1 and stream[-1].final
    assert len({r.text for r in results}) > 1  # adapters really change the output
    loaded = [key for r in results for key in r.loaded]
    # capacity 2 over three adapters: loads follow the groups [alpha, base, beta] [gamma, alpha] [beta]
    assert loaded == ["alpha@v1", "beta@v1", "gamma@v1", "alpha@v1", "beta@v1"] and cache.evictions == 3


def test_broken_adapter_fails_its_jobs_only(engine, tiny_adapters, tmp_path):
    bad = ref("broken", broken_copy(tiny_adapters["beta"], tmp_path / "broken"))
    good = ref("alpha", tiny_adapters["alpha"])
    jobs = [Job("The patient", 1, bad, 5), Job("The patient", 1, good, 5), Job("Revenue", 1, bad, 5), Job("Revenue", 1, None, 5)]
    results, _ = run(BatchRunner(engine, AdapterCache(engine, 4)), jobs)
    assert [r.error_kind for r in results] == ["adapter_load", None, "adapter_load", None]
    assert "broken@v1" in results[0].error and results[1].completion_tokens > 0 and results[3].finish_reason
