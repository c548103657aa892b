"""The continuous-batching scheduler on a real tiny engine (no Ray): jobs submitted while others decode
give the tokens of a direct engine run, the queue refuses what it cannot hold, cancelled jobs free their rows."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from carve.artifact import AdapterRef
from carve.engine.adapter_cache import AdapterCache
from carve.engine.batching import BatchRunner, Job, JobEvent, JobResult
from carve.engine.scheduler import ForwardCost, Limits, QueueFull, Scheduler, prefill_budget

PROMPTS = ["The patient was", "Revenue rose", "Gene expression", "Question: Is", "The company said", "### Instruction:"]


@pytest.fixture()
def engine(tiny_model_dir: Path):
    from carve.engine.loading import open_engine

    return open_engine(str(tiny_model_dir))[0]


class Collector:
    """Each job's events, and a wait for its final one."""

    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        self.done = threading.Event()

    def __call__(self, event: JobEvent) -> None:
        self.events.append(event)
        if event.final:
            self.done.set()

    def result(self, timeout: float = 60) -> JobResult:
        assert self.done.wait(timeout), "no final event"
        result = JobResult()
        for event in self.events:
            result.add(event)
        return result


def ref(tiny_adapters: dict[str, Path], name: str) -> AdapterRef:
    return AdapterRef(name, 1, str(tiny_adapters[name]))


def direct(reference, jobs: list[Job]) -> list[JobResult]:
    """The same jobs through the static batch runner on an engine holding every adapter: what each must give."""
    results = [JobResult() for _ in jobs]
    BatchRunner(reference, AdapterCache(reference, 8)).run(jobs, lambda i, event: results[i].add(event))
    return results


@pytest.fixture()
def scheduler(engine):
    made: list[Scheduler] = []

    def make(capacity: int = 4, **limits: float) -> Scheduler:
        made.append(Scheduler(engine, AdapterCache(engine, capacity), Limits(**limits)))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_jobs_joining_while_others_decode_give_the_direct_tokens(scheduler, reference, tiny_adapters):
    alpha, beta, gamma = (ref(tiny_adapters, n) for n in ("alpha", "beta", "gamma"))
    ids = tuple(reference.encode(PROMPTS[3]))
    jobs = [
        Job(PROMPTS[0], 1, alpha, 24, ignore_eos=True),
        Job(PROMPTS[1], 1, None, 10, ignore_eos=True),
        Job(PROMPTS[2], 1, beta, 14, temperature=0.9, seed=5, ignore_eos=True),
        Job(ids, len(ids), gamma, 6, logprobs=2, prompt_logprobs=1, ignore_eos=True),  # echo + generated logprobs
        Job(PROMPTS[4], 1, None, 9, mixture=((alpha, 0.6), (beta, 0.4)), ignore_eos=True),  # output-space mixture: two rows
        Job(PROMPTS[5], 1, None, 7, mixture=((alpha, 0.5), (gamma, 0.5)), space="weights", ignore_eos=True),
        Job(ids, len(ids), beta, 0, prompt_logprobs=3),  # echo only
        Job(PROMPTS[0], 1, gamma, 12, stop=("the",)),
    ]
    sched = scheduler(capacity=2, max_running=4, max_step_tokens=6)  # three adapters over two slots, prompts read in chunks
    collectors = [Collector() for _ in jobs]
    for job, collector in zip(jobs, collectors):
        sched.submit(job, collector)
        time.sleep(0.05)  # arrivals while earlier jobs decode
    got = [c.result() for c in collectors]
    want = direct(reference, jobs)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.error is None, f"job {i}: {g.error}"
        assert (g.text, g.completion_tokens, g.finish_reason) == (w.text, w.completion_tokens, w.finish_reason), f"job {i}"
        assert [e.token_id for e in g.logprobs] == [e.token_id for e in w.logprobs]
        assert [e.logprob for e in g.logprobs] == pytest.approx([e.logprob for e in w.logprobs], abs=1e-4)
        if w.prompt_logprobs is not None:
            assert [e and e.logprob for e in g.prompt_logprobs] == pytest.approx([e and e.logprob for e in w.prompt_logprobs], abs=1e-4)
        assert sum(e.final for e in collectors[i].events) == 1 and collectors[i].events[-1].final
        assert g.queue_s is not None and g.queue_s >= 0
    assert len({r.text for r in got}) > 2
    assert sched.steps > 0 and sched.load().running == 0
    assert sorted({k for r in got for k in r.loaded}) == ["alpha@v1", "beta@v1", "gamma@v1"]
    assert got[0].load is not None and got[0].load.replica == "engine"


def test_the_prefill_chunk_is_cut_to_the_step_target_by_the_measured_costs():
    target = Limits(max_step_tokens=512, max_step_s=0.2)
    assert prefill_budget(target, rows=8, cost=(0.02, 0.001)) == 172  # (0.2 - 0.02) / 0.001 tokens in the pass, 8 of them the rows'
    assert prefill_budget(target, rows=8, cost=(0.0, 0.0001)) == 504  # the token budget still bounds it
    assert prefill_budget(target, rows=8, cost=(0.19, 0.002)) == 16  # over target already: the floor
    assert prefill_budget(target, rows=0, cost=(0.02, 0.001)) == 512  # nobody waits on this step
    assert prefill_budget(target, rows=8, cost=(0.0, 0.0)) == 504  # no cost measured yet
    assert prefill_budget(Limits(max_step_tokens=512), rows=8, cost=(0.02, 0.001)) == 504  # no target
    with pytest.raises(ValueError):
        Limits(max_step_s=0)


def test_lowering_a_thread_s_priority_leaves_its_caller_s():
    """nice applies to the calling thread (Linux): the engine's loop yields the CPU, the thread that started it keeps its priority."""
    import os

    from carve.engine.engine_thread import lower_thread_priority

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int] = {}

    def loop() -> None:
        lower_thread_priority(3)
        seen["loop"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = threading.Thread(target=lambda: seen.setdefault("child", os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        child.start()
        child.join()

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert seen == {"loop": min(19, mine + 3), "child": min(19, mine + 3)}  # torch's workers, started by the loop, inherit it
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    with pytest.raises(ValueError):
        Limits(nice=20)


def test_forward_cost_separates_a_forward_s_fixed_cost_from_its_cost_per_token():
    cost = ForwardCost()
    assert cost.line() == (0.0, 0.0)
    for tokens in (16, 128, 40, 300, 16, 77):
        cost.observe(tokens, 0.03 + 0.002 * tokens)
    fixed, per_token = cost.line()
    assert fixed == pytest.approx(0.03) and per_token == pytest.approx(0.002)
    same = ForwardCost()
    for _ in range(3):
        same.observe(32, 0.064)
    assert same.line() == pytest.approx((0.0, 0.002))  # one width only: no slope to fit


def test_under_a_step_target_prompts_join_in_small_chunks_and_give_the_direct_tokens(scheduler, reference):
    long_prompt = " ".join(PROMPTS * 3)
    jobs = [Job(PROMPTS[0], 1, None, 30, ignore_eos=True), Job(long_prompt, 1, None, 8, ignore_eos=True), Job(long_prompt[5:], 1, None, 5, ignore_eos=True)]
    sched = scheduler(max_running=4, max_step_s=1e-6, min_prefill_tokens=2)  # every step over target: 2-token chunks
    collectors = [Collector() for _ in jobs]
    for job, collector in zip(jobs, collectors):
        sched.submit(job, collector)
        time.sleep(0.05)
    got, want = [c.result() for c in collectors], direct(reference, jobs)
    assert [(g.text, g.completion_tokens) for g in got] == [(w.text, w.completion_tokens) for w in want]
    assert all(g.completion_tokens == j.max_new_tokens for g, j in zip(got, jobs))
    assert sched.forward_cost.line()[1] > 0


def test_a_full_queue_refuses_at_once_and_accepted_jobs_complete(scheduler):
    sched = scheduler(max_running=1, max_waiting=2)
    accepted: list[Collector] = []
    refused: list[QueueFull] = []
    for i in range(6):
        collector = Collector()
        try:
            sched.submit(Job(PROMPTS[i], 1, None, 20, ignore_eos=True), collector)
            accepted.append(collector)
        except QueueFull as exc:
            refused.append(exc)
    assert 2 <= len(accepted) <= 3 and len(refused) == 6 - len(accepted)
    assert all(exc.retry_after_s >= 1 and "at capacity" in str(exc) for exc in refused)
    assert all(c.result().completion_tokens == 20 for c in accepted)


def test_a_cancelled_job_frees_its_row_and_others_continue(scheduler, reference):
    sched = scheduler(max_running=1)
    long, short = Collector(), Collector()
    ticket = sched.submit(Job(PROMPTS[0], 1, None, 400, ignore_eos=True), long)
    sched.submit(Job(PROMPTS[1], 1, None, 5, ignore_eos=True), short)  # waits: one row only
    deadline = time.monotonic() + 30
    while len(long.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not short.done.is_set()
    sched.cancel(ticket)
    result = short.result()
    assert result.text == direct(reference, [Job(PROMPTS[1], 1, None, 5, ignore_eos=True)])[0].text
    assert long.events[-1].error_kind == "cancelled" and sum(e.final for e in long.events) == 1
    assert sum(e.tokens for e in long.events) < 400


def test_a_broken_adapter_or_an_oversized_mixture_fails_its_job_only(scheduler, tiny_adapters, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_adapters["beta"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    sched = scheduler(capacity=2)
    alpha, beta, gamma = (ref(tiny_adapters, n) for n in ("alpha", "beta", "gamma"))
    jobs = [
        Job(PROMPTS[0], 1, AdapterRef("broken", 1, str(broken)), 5),
        Job(PROMPTS[1], 1, alpha, 5, ignore_eos=True),
        Job(PROMPTS[2], 1, None, 5, mixture=((alpha, 1.0), (beta, 1.0), (gamma, 1.0))),  # three adapters, two slots
        Job(PROMPTS[3], 1, None, 5, ignore_eos=True),
    ]
    collectors = [Collector() for _ in jobs]
    for job, collector in zip(jobs, collectors):
        sched.submit(job, collector)
    results = [c.result() for c in collectors]
    assert [r.error_kind for r in results] == ["adapter_load", None, "adapter_load", None]
    assert "broken@v1 could not be loaded" in results[0].error
    assert "needs 3 adapters" in results[2].error and "at most 2" in results[2].error
    assert results[1].completion_tokens == results[3].completion_tokens == 5


def test_an_engine_thread_runs_its_work_in_order_on_one_thread_and_raises_its_errors():
    from carve.engine.engine_thread import EngineThread

    worker = EngineThread("test-engine")
    try:
        seen = [worker.submit(lambda i=i: (i, threading.get_ident())) for i in range(5)]
        assert [f.result() for f in seen] == [(i, worker.ident) for i in range(5)]
        assert worker.ident != threading.get_ident()
        (thread,) = [t for t in threading.enumerate() if t.ident == worker.ident]
        assert thread.daemon and thread.name == "test-engine"  # a loop left running never holds up the process's exit
        with pytest.raises(ZeroDivisionError):
            worker.run(lambda: 1 / 0)
        assert worker.run(lambda: "still serving") == "still serving"
    finally:
        worker.shutdown()


def test_an_engine_thread_takes_its_nice_before_any_work(monkeypatch):
    """The priority is set first, before torch's thread count, so the torch workers it starts when loading inherit it."""
    import os

    import carve.engine.engine_thread as engine_thread

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if mine > 16:
        pytest.skip("the test process already runs near the lowest priority")
    seen: list[int] = []
    monkeypatch.setattr(engine_thread, "_set_torch_threads", lambda count: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    worker = engine_thread.EngineThread("test-nice", torch_threads=1, nice=2)
    try:
        assert seen == [mine + 2]  # already lowered when the torch threads were set, the first torch call
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    finally:
        worker.shutdown()


def test_a_scheduler_loop_that_dies_says_why(engine):
    """An exception outside the loop's per-step guard ends the loop; the scheduler reports it (health checks show it)."""
    class BrokenSession:
        @property
        def idle(self) -> bool:
            raise RuntimeError("broken session")

    sched = Scheduler(engine, AdapterCache(engine, 2), Limits())
    sched.session = BrokenSession()
    with sched._cond:  # woken with nothing to do, the loop asks the session whether it is idle: outside the step's guard
        sched._cond.notify()
    for _ in range(100):
        if not sched.alive:
            break
        time.sleep(0.05)
    assert not sched.alive
    assert isinstance(sched.failure, RuntimeError) and "broken session" in str(sched.failure)
    sched.close()


def test_a_scheduler_decodes_on_the_engine_thread_it_is_given_and_hands_it_back_when_closed(engine):
    """A replica loads and decodes on one thread (one OpenMP pool): every forward pass of the loop runs there."""
    from carve.engine.engine_thread import EngineThread

    worker = EngineThread("test-engine")
    passes: list[int] = []
    forward = engine.runner.forward_parts

    def recorded(*args, **kwargs):
        passes.append(threading.get_ident())
        return forward(*args, **kwargs)

    engine.runner.forward_parts = recorded
    sched = Scheduler(engine, AdapterCache(engine, 2), Limits(), thread=worker)
    try:
        collector = Collector()
        sched.submit(Job(PROMPTS[0], 1, None, 5, ignore_eos=True), collector)
        assert collector.result().completion_tokens == 5
        assert passes and set(passes) == {worker.ident}
        assert sched.alive
    finally:
        sched.close()
        engine.runner.forward_parts = forward
    assert not sched.alive
    assert worker.run(threading.get_ident) == worker.ident  # the loop gave the thread back
    worker.shutdown()
