"""Prompt scoring, generated-token logprobs, penalties and logit bias on a real tiny engine (no Ray), against brute-force references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carve.artifact import AdapterRef
from carve.engine.adapter_cache import AdapterCache
from carve.engine.batching import BatchRunner, Job, JobResult
from carve.engine.decoding import Engine, GenerationRequest, Sampling, adjust_scores
from carve.engine.scoring import score_prompts

PROMPTS = ["The patient was treated with aspirin", "Revenue rose", "Gene expression of BRCA1 was measured", "Q"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> Engine:
    from carve.engine.loading import open_engine

    return open_engine(str(tiny_model_dir), list(tiny_adapters.items()))[0]


def full_logprobs(engine: Engine, ids: list[int], adapter: str | None) -> torch.Tensor:
    """One sequence alone, no padding: log-softmax at every position [len, vocab]."""
    with torch.inference_mode():
        if adapter is None:
            with engine.model.disable_adapter():
                logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
        else:
            logits = engine.model(input_ids=torch.tensor([ids]), adapter_names=[adapter]).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def test_scores_equal_each_prompt_alone_in_a_mixed_batch(engine: Engine) -> None:
    ids = [engine.encode(p) for p in PROMPTS]
    specs = ["alpha", None, "beta", "gamma"]
    scored = score_prompts(engine, ids, specs, top_k=3)
    for prompt, spec, got in zip(ids, specs, scored):
        assert len(got) == len(prompt) and got[0] is None
        want = full_logprobs(engine, prompt, spec)
        for position, entry in enumerate(got[1:], start=1):
            assert entry is not None and entry.token_id == prompt[position]
            assert entry.logprob == pytest.approx(float(want[position - 1, prompt[position]]), abs=1e-5)
            top = torch.topk(want[position - 1], 3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert scored[0][1].logprob != pytest.approx(score_prompts(engine, [ids[0]], [None])[0][1].logprob, abs=1e-4)  # the adapter matters


def test_mixture_scores_are_the_log_of_the_weighted_mixture(engine: Engine) -> None:
    ids = engine.encode(PROMPTS[2])
    (got,) = score_prompts(engine, [ids], [(("alpha", 3.0), (None, 1.0))])
    mixture = (0.75 * full_logprobs(engine, ids, "alpha").exp() + 0.25 * full_logprobs(engine, ids, None).exp()).log()
    assert [e.logprob for e in got[1:]] == pytest.approx([float(mixture[p - 1, ids[p]]) for p in range(1, len(ids))], abs=1e-5)


def run_jobs(engine: Engine, jobs: list[Job]) -> list[JobResult]:
    results = [JobResult() for _ in jobs]
    BatchRunner(engine, AdapterCache(engine, 4)).run(jobs, lambda i, event: results[i].add(event))
    return results


def test_runner_returns_prompt_and_generated_logprobs(engine: Engine, tiny_adapters: dict[str, Path]) -> None:
    alpha = AdapterRef("alpha", 1, str(tiny_adapters["alpha"]))
    ids = tuple(engine.encode(PROMPTS[0]))
    echo_only, both, plain = run_jobs(engine, [
        Job(ids, len(ids), alpha, 0, prompt_logprobs=2),
        Job(ids, len(ids), alpha, 4, temperature=0, prompt_logprobs=1, logprobs=2, ignore_eos=True),
        Job(ids, len(ids), alpha, 4, temperature=0, ignore_eos=True),
    ])
    assert echo_only.error is None and echo_only.finish_reason == "length" and echo_only.completion_tokens == 0
    assert len(echo_only.prompt_logprobs) == len(ids) and echo_only.prompt_logprobs[0] is None
    assert [len(e.top) for e in echo_only.prompt_logprobs[1:]] == [2] * (len(ids) - 1)
    assert [e.logprob for e in both.prompt_logprobs[1:]] == [e.logprob for e in echo_only.prompt_logprobs[1:]]
    assert both.text == plain.text and plain.logprobs == [] and plain.prompt_logprobs is None  # asking for logprobs changes nothing
    generated = [e.token_id for e in both.logprobs]
    assert len(generated) == both.completion_tokens == 4
    for step, entry in enumerate(both.logprobs):  # the engine's cached decoding against a full re-run under the same adapter
        want = full_logprobs(engine, list(ids) + generated[:step], "alpha")[-1]
        assert entry.logprob == pytest.approx(float(want[entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == torch.topk(want, 2).indices.tolist() and entry.top[0][0] == entry.token_id  # greedy: the best


def test_adjust_scores_applies_openai_penalties_and_bias() -> None:
    scores = torch.zeros(6)
    plain = Sampling()
    assert adjust_scores(scores, plain, [1, 1, 2]) is scores  # defaults: the very same tensor, greedy unchanged
    sampling = Sampling(frequency_penalty=0.5, presence_penalty=1.0, logit_bias=((4, 2.0), (5, -100.0)))
    got = adjust_scores(scores, sampling, [1, 1, 2])
    assert got.tolist() == [0.0, -2.0, -1.5, 0.0, 2.0, -100.0]
    assert scores.tolist() == [0.0] * 6  # the input is not modified


def reference_greedy(engine: Engine, prompt: str, sampling: Sampling) -> list[int]:
    """Greedy decoding with the penalties and bias applied by hand, the whole sequence re-run each step."""
    ids = engine.encode(prompt)
    generated: list[int] = []
    for _ in range(sampling.max_new_tokens):
        scores = full_logprobs(engine, ids + generated, None)[-1].float()
        vocab = scores.shape[0]
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab).float() if generated else torch.zeros(vocab)
        scores = scores - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).float()
        for token, bias in sampling.logit_bias:
            scores[token] += bias
        generated.append(int(scores.argmax()))
    return generated


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(max_new_tokens=10, frequency_penalty=1.5, ignore_eos=True),
        Sampling(max_new_tokens=10, presence_penalty=2.0, ignore_eos=True),
        Sampling(max_new_tokens=6, logit_bias=((7, 100.0),), ignore_eos=True),
    ],
)
def test_penalties_and_bias_decode_as_the_reference(engine: Engine, sampling: Sampling) -> None:
    changed = False
    for prompt in PROMPTS:
        got = engine.generate([GenerationRequest.single(prompt, None, sampling)])[0].token_ids
        assert got == reference_greedy(engine, prompt, sampling), prompt
        plain = Sampling(max_new_tokens=sampling.max_new_tokens, ignore_eos=True)
        changed = changed or got != engine.generate([GenerationRequest.single(prompt, None, plain)])[0].token_ids
    assert changed  # the setting really changes the decoding
