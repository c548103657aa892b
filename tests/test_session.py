"""Continuous batching in the engine: requests that join a running batch mid-decode, prompts run in chunks,
and requests cancelled mid-way decode exactly as each request does alone, on every forward path."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Iterator

import pytest
import torch

from carve.engine.decoding import Branch, Engine, EngineError, GenerationRequest, Sampling
from carve.engine.drafting import DraftSettings, propose
from carve.engine.models import load_base, plan_load, resolve_model

PROMPTS = [
    "The patient was treated with",
    "Gene expression",
    "Question: Is metformin used for type 2 diabetes? Answer:",
    "Revenue rose",
    "1. Instruction: Name the disease.\n1. Input: The child had measles.\n2. Instruction:",
    "A long clinical note: the patient, a 54 year old man with a history of hypertension and type 2 diabetes, presented with",
]
PATHS = {"runner": dict(), "multi": dict(runner=False), "peft": dict(runner=False, multi_lora=False), "runner-bf16": dict(weight_format="bf16")}
# (forward path, model): every path on the Llama; the runner also on the Gemma 3, whose sliding-window masks
# must follow rows that join, leave and merge; the runner on bf16 weight copies, whose products must stay
# row-invariant like fp32's
ENGINES = [(path, "llama") for path in PATHS] + [("runner", "gemma3")]


@pytest.fixture(scope="module", params=ENGINES, ids=[f"{path}-{model}" for path, model in ENGINES])
def engine(request: pytest.FixtureRequest) -> Engine:
    path, architecture = request.param
    folder = request.getfixturevalue("tiny_gemma_dir" if architecture == "gemma3" else "tiny_model_dir")
    adapters = request.getfixturevalue("tiny_gemma_adapters" if architecture == "gemma3" else "tiny_adapters")
    model, tokenizer = load_base(resolve_model(str(folder)), plan_load(False))
    eng = Engine(model, tokenizer, base_label="tiny", **PATHS[path])
    for name, adapter in adapters.items():
        eng.load_adapter(name, adapter)
    assert eng.forward_path() == path.removesuffix("-bf16")
    return eng


@pytest.fixture(autouse=True)
def empty_prefix_cache(engine: Engine) -> None:
    """Each test starts with nothing kept: what an earlier test ran must not be copied into this one's prefill."""
    if engine.prefix_cache is not None:
        engine.prefix_cache.forget()


def requests() -> list[GenerationRequest]:
    """Single adapters, the base, a mixture and a contrast, greedy and seeded sampling, different lengths."""
    return [
        GenerationRequest.single(PROMPTS[0], "alpha", Sampling(max_new_tokens=14)),
        GenerationRequest.single(PROMPTS[1], None, Sampling(max_new_tokens=6)),
        GenerationRequest((Branch(PROMPTS[2], "alpha", 0.7), Branch(PROMPTS[3], "beta", 0.3)), "mixture", Sampling(max_new_tokens=10)),
        GenerationRequest.single(PROMPTS[4], "gamma", Sampling(max_new_tokens=9, temperature=0.8, seed=11)),
        GenerationRequest((Branch(PROMPTS[5], "beta"), Branch(PROMPTS[5], None, 0.5)), "contrast", Sampling(max_new_tokens=12)),
        GenerationRequest.single(PROMPTS[5], "beta", Sampling(max_new_tokens=3)),
    ]


def drive(
    engine: Engine, arrivals: dict[int, list[GenerationRequest]], budget: int | None, cancel: dict[int, int] | None = None, fused: bool = False
) -> dict[int, list[int]]:
    """Step a session, admitting ``arrivals[step]`` before that step and cancelling ``cancel[step]`` (by arrival order); tokens per arrival order.

    ``fused``: while rows decode, prompt chunks run in the step's own forward pass (``step(prefill_budget=budget)``).
    """
    session = engine.session()
    ids: list[int] = []
    tokens: dict[int, list[int]] = {}
    step = 0
    while step <= max(arrivals) or not session.idle:
        ids += session.admit(arrivals.get(step, []))
        if cancel and step in cancel:
            assert session.cancel(ids[cancel[step]])
        if fused and session.rows and budget:
            events = session.step(prefill_budget=budget)
        else:
            session.prefill(budget)
            events = session.step()
        for event in events:
            tokens.setdefault(ids.index(event.index), []).append(event.token_id)  # type: ignore[arg-type]
        step += 1
    return tokens


def alone(engine: Engine, request: GenerationRequest) -> list[int]:
    """The brute force: the request by itself, its whole prompt run (no prefix shared, copied or kept)."""
    engine.share_prefixes = False
    try:
        return engine.generate([request])[0].token_ids
    finally:
        engine.share_prefixes = True


@pytest.mark.parametrize("budget,fused", [(None, False), (7, False), (7, True), (3, True)])
def test_requests_joining_a_running_batch_decode_as_alone(engine: Engine, budget: int | None, fused: bool) -> None:
    reqs = requests()
    got = drive(engine, {0: reqs[:2], 2: reqs[2:4], 3: [reqs[4]], 9: [reqs[5]]}, budget, fused=fused)
    for i, request in enumerate(reqs):
        assert got[i] == alone(engine, request), f"request {i}"


def read_lazily(reqs: list[GenerationRequest], pulled: list[int]) -> Iterator[GenerationRequest]:
    """The requests one by one, noting in ``pulled`` which the engine has read."""
    for i, request in enumerate(reqs):
        pulled.append(i)
        yield request


@pytest.mark.parametrize("max_rows", [1, 2, 3])
def test_offline_batches_under_a_row_cap_decode_as_alone_and_read_requests_lazily(engine: Engine, max_rows: int) -> None:
    """Engine.complete keeps at most ``max_rows`` rows (a two-branch request alone when the cap is 1), reads the next request
    only when there is room for it, and gives every request the tokens it gets alone."""
    reqs = requests()
    pulled: list[int] = []
    sessions = []
    make_session = engine.session
    engine.session = lambda: sessions.append(make_session()) or sessions[-1]  # type: ignore[method-assign]
    finished: list[int] = []
    widest = 0
    try:
        for index, completion in engine.complete(read_lazily(reqs, pulled), max_rows=max_rows):
            assert completion.token_ids == alone(engine, reqs[index]), f"request {index}"
            finished.append(index)
            widest = max(widest, sessions[0].rows + sessions[0].prefilling_rows)
    finally:
        del engine.session
    assert sorted(finished) == list(range(len(reqs)))
    assert widest <= max(max_rows, 2)  # a two-branch request runs alone when the cap is 1


def test_a_caller_that_stops_early_decodes_no_further_request(engine: Engine) -> None:
    reqs = requests()
    pulled: list[int] = []
    completions = engine.complete(read_lazily(reqs, pulled), max_rows=1)
    first, _ = next(completions)
    completions.close()
    assert first == 0 and pulled == [0, 1]  # the second is read when the first's row frees, and never decoded
    with ThreadPoolExecutor(1) as other:  # the engine's lock was let go (it is re-entrant: ask from another thread)
        assert other.submit(engine.lock.acquire, timeout=5).result()
        other.submit(engine.lock.release).result()


def test_chunked_prefill_lets_running_rows_stream_between_chunks(engine: Engine) -> None:
    session = engine.session()
    first = session.admit([GenerationRequest.single(PROMPTS[0], "alpha", Sampling(max_new_tokens=30))])
    session.prefill()
    session.step()
    second = session.admit([GenerationRequest.single(PROMPTS[5], "beta", Sampling(max_new_tokens=2))])
    long_prompt = len(engine.encode(PROMPTS[5]))
    chunks = 0
    while session.prefilling:
        assert session.prefill(4) <= 4
        chunks += 1
        expected = first + second if not session.prefilling else first  # the last chunk merges the newcomer
        assert [e.index for e in session.step()] == expected, "the running request gets a token between prefill chunks"
    assert chunks == -(-long_prompt // 4)


def test_a_cancelled_request_leaves_and_the_rest_decode_as_alone(engine: Engine) -> None:
    reqs = requests()
    got = drive(engine, {0: reqs[:3], 1: reqs[3:5]}, None, cancel={4: 0, 5: 3})
    assert len(got[0]) == 4 and len(got[3]) == 4  # stopped at once: 4 tokens, each, before the cancel
    for i in (1, 2, 4):
        assert got[i] == alone(engine, reqs[i]), f"request {i}"


def test_a_request_cancelled_while_its_prompt_runs_never_decodes(engine: Engine) -> None:
    session = engine.session()
    keep, drop = session.admit([GenerationRequest.single(PROMPTS[0], "alpha", Sampling(max_new_tokens=3))]), session.admit(
        [GenerationRequest.single(PROMPTS[5], "beta", Sampling(max_new_tokens=3))]
    )
    session.prefill(len(engine.encode(PROMPTS[0])))  # the first group only
    assert session.cancel(drop[0]) and not session.cancel(drop[0])
    indices = set()
    while not session.idle:
        session.prefill()
        indices |= {e.index for e in session.step()}
    assert indices == set(keep)


def test_bad_admissions_change_nothing(engine: Engine) -> None:
    session = engine.session()
    session.admit([GenerationRequest.single(PROMPTS[0], "alpha", Sampling(max_new_tokens=2))])
    with pytest.raises(EngineError, match="not loaded"):
        session.admit([GenerationRequest.single(PROMPTS[1], "alpha"), GenerationRequest.single(PROMPTS[1], "nope")])
    with pytest.raises(EngineError, match="empty prompt"):
        session.admit([GenerationRequest.single("", None)])
    assert len(session.requests) == 1 and session.prefilling == 1


DEMOS = "Question: What does an enzyme do?\nAnswer: It speeds up a reaction.\n\nQuestion: What carries oxygen in blood?\nAnswer: Haemoglobin.\n\n"


def test_a_prompt_prefix_run_once_is_copied_for_later_requests_and_changes_no_token(engine: Engine) -> None:
    """Automatic prefix caching: a prefix two requests shared is kept, a later request starting with it (alone, with
    another adapter beside, or with a longer common start) copies it, and every token is the brute force's."""
    if engine.prefix_cache is None:
        pytest.skip("the prefix cache keeps the runner's caches only")
    questions = ["Question: What is insulin?\nAnswer:", "Question: Name a virus.\nAnswer:", "Question: What is a gene?\nAnswer:"]
    reqs = [GenerationRequest.single(DEMOS + q, "alpha", Sampling(max_new_tokens=6)) for q in questions]
    reqs.append(GenerationRequest((Branch(DEMOS + questions[0], "alpha", 0.6), Branch(DEMOS + questions[1], "beta", 0.4)), "mixture", Sampling(max_new_tokens=5)))
    engine.prefix_cache.forget()
    expected = [alone(engine, r) for r in reqs]
    assert len(engine.prefix_cache) == 0
    first = engine.generate(reqs[:2])  # two rows sharing the demonstrations: run once; it and both prompts kept
    assert len(engine.prefix_cache) == 3
    copied = engine.prefix_cache.reused_tokens
    third = engine.generate([reqs[2]])  # alone, yet its demonstrations are copied
    assert engine.prefix_cache.reused_tokens > copied
    fourth = engine.generate([reqs[3]])  # beta has no kept prefix: both branches run theirs (and keep it)
    assert [c.token_ids for c in first + third + fourth] == expected


def test_a_request_alone_keeps_its_prompt_for_the_next_that_starts_the_same(engine: Engine) -> None:
    """As a server sees them: one request at a time, the second (a longer conversation, say) copies the first's prompt."""
    if engine.prefix_cache is None:
        pytest.skip("the prefix cache keeps the runner's caches only")
    turn = DEMOS + "Question: What is insulin?\nAnswer:"
    reqs = [GenerationRequest.single(turn, "gamma", Sampling(max_new_tokens=5)),
            GenerationRequest.single(turn + " A hormone.\n\nQuestion: Where is it made?\nAnswer:", "gamma", Sampling(max_new_tokens=5, temperature=0.9, seed=3))]
    engine.prefix_cache.forget()
    expected = [alone(engine, r) for r in reqs]
    got = [engine.generate([reqs[0]])[0].token_ids]
    copied = engine.prefix_cache.reused_tokens
    got.append(engine.generate([reqs[1]])[0].token_ids)
    assert engine.prefix_cache.reused_tokens - copied == len(engine.encode(turn)) - 1
    assert got == expected


def test_a_kept_prefix_evicted_between_admission_and_prefill_is_run_instead(engine: Engine) -> None:
    if engine.prefix_cache is None:
        pytest.skip("the prefix cache keeps the runner's caches only")
    request = GenerationRequest.single(DEMOS + "Question: Name a virus.\nAnswer:", "alpha", Sampling(max_new_tokens=5))
    engine.generate([GenerationRequest.single(DEMOS + "Question: What is insulin?\nAnswer:", "alpha", Sampling(max_new_tokens=1))])
    session = engine.session()
    (request_id,) = session.admit([request])  # matched the kept demonstrations here
    engine.prefix_cache.forget()  # and they are gone before its prompt runs
    tokens = []
    while not session.idle:
        session.prefill()
        tokens += [e.token_id for e in session.step() if e.index == request_id]
    assert tokens == alone(engine, request)


def test_an_adapter_loaded_again_under_its_name_takes_its_kept_prefixes_with_it(engine: Engine, request: pytest.FixtureRequest) -> None:
    if engine.prefix_cache is None:
        pytest.skip("the prefix cache keeps the runner's caches only")
    adapters = request.getfixturevalue("tiny_gemma_adapters" if engine.sliding_window else "tiny_adapters")
    prompts = [DEMOS + "Question: What is insulin?\nAnswer:", DEMOS + "Question: Name a virus.\nAnswer:"]
    engine.generate([GenerationRequest.single(p, "alpha", Sampling(max_new_tokens=3)) for p in prompts])
    assert engine.prefix_cache.match(["alpha"], [engine.encode(prompts[0])]) > 0
    engine.unload_adapter("alpha")
    try:
        engine.load_adapter("alpha", adapters["beta"])  # other weights, same name
        assert engine.prefix_cache.match(["alpha"], [engine.encode(prompts[0])]) == 0
        as_beta = engine.generate([GenerationRequest.single(prompts[0], "beta", Sampling(max_new_tokens=4))])[0].token_ids
        assert engine.generate([GenerationRequest.single(prompts[0], "alpha", Sampling(max_new_tokens=4))])[0].token_ids == as_beta
    finally:
        engine.unload_adapter("alpha")
        engine.load_adapter("alpha", adapters["alpha"])


REPEATING = "one two three one two three one two three one two"


@pytest.mark.parametrize("max_rows", [1, 8])
def test_drafted_tokens_change_no_token(engine: Engine, max_rows: int) -> None:
    """Speculative decoding by prompt lookup: greedy rows check drafts from their own context in one pass, and every
    request (greedy ones drafting, the sampled, the mixture and the contrast beside them) gets the tokens it gets alone."""
    if engine.forward_path() != "runner":
        pytest.skip("drafts are checked on the runner's cache only")
    reqs = [
        GenerationRequest.single(REPEATING, "alpha", Sampling(max_new_tokens=24)),
        GenerationRequest.single(REPEATING + " " + PROMPTS[0], None, Sampling(max_new_tokens=20, stop=("three one",))),
        *requests(),
    ]
    expected = [alone(engine, request) for request in reqs]
    before = engine.drafted_tokens, engine.accepted_draft_tokens
    engine.drafts = DraftSettings(tokens=4, max_rows=max_rows)
    try:
        got = drive(engine, {0: reqs[:2], 1: reqs[2:4], 3: reqs[4:]}, 7, fused=True)
        for i, request in enumerate(reqs):
            assert got[i] == expected[i], f"request {i}"
            assert engine.generate([request])[0].token_ids == expected[i], f"request {i} alone, drafting"
    finally:
        engine.drafts = DraftSettings()
    drafted, accepted = engine.drafted_tokens - before[0], engine.accepted_draft_tokens - before[1]
    assert drafted > 0 and 0 < accepted <= drafted


def test_sampled_rows_draft_and_keep_their_seeded_text(engine: Engine) -> None:
    """A sampled row checks its draft by sampling each position as it would without drafts (its generator restored
    at the first token it would not have drafted): a seeded request's text is the same with drafts or without."""
    if engine.forward_path() != "runner":
        pytest.skip("drafts are checked on the runner's cache only")
    two = tuple((token, 30.0) for token in engine.encode("one two")[:2])  # a tiny random model's sample then repeats itself
    reqs = [
        GenerationRequest.single(REPEATING, "alpha", Sampling(max_new_tokens=24, temperature=0.05, seed=3)),
        GenerationRequest.single(REPEATING, None, Sampling(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=4, frequency_penalty=0.2)),
        replace(GenerationRequest.single(REPEATING, "beta", Sampling(max_new_tokens=24, temperature=1.0, seed=5, logit_bias=two)), record_scores=True),
    ]
    expected = [engine.generate([request])[0] for request in reqs]
    before = engine.drafted_tokens, engine.accepted_draft_tokens
    engine.drafts = DraftSettings(tokens=4, max_rows=4)
    try:
        got = engine.generate(reqs)
    finally:
        engine.drafts = DraftSettings()
    for i, (completion, alone_) in enumerate(zip(got, expected)):
        assert completion.token_ids == alone_.token_ids, f"request {i}"
    recorded, alone_scores = got[2].step_scores or [], expected[2].step_scores or []
    assert len(recorded) == len(alone_scores) == len(got[2].token_ids)  # every kept draft token has its scores
    tolerance = 5e-2 if engine.runner.weight_format == "bf16" else 1e-4  # a draft's columns run in a wider product: bf16 rounds them otherwise
    assert all(torch.allclose(a, b, atol=tolerance) for a, b in zip(recorded, alone_scores))
    drafted, accepted = engine.drafted_tokens - before[0], engine.accepted_draft_tokens - before[1]
    assert drafted > 0 and 0 < accepted <= drafted


def test_a_draft_is_what_followed_the_latest_longest_match_of_the_row_s_end() -> None:
    settings = DraftSettings(tokens=3, min_match=2, max_match=3)
    assert propose([5, 6, 7, 1, 2, 9, 9, 5, 6, 8, 8, 8, 5, 6], settings, 10) == [8, 8, 8]  # the latest "5 6", not the first
    assert propose([1, 2, 3, 4, 9, 2, 3, 7, 1, 2, 3], settings, 10) == [4, 9, 2]  # "1 2 3" beats the later "2 3"
    assert propose([1, 2, 3, 4, 9, 2, 3, 7, 1, 2, 3], settings, 2) == [4, 9]  # no more than the row may still write
    assert propose([1, 2, 3, 4, 5, 6], settings, 10) == []  # nothing repeats
    assert propose([4, 4, 4, 4], settings, 10) == [4]  # a run: the token after the match is the run's last
    assert propose([1, 2, 1, 2], DraftSettings(), 10) == []  # tokens 0: off
    with pytest.raises(ValueError, match="bad draft settings"):
        DraftSettings(tokens=2, min_match=3, max_match=2)
