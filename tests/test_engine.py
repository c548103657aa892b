"""The decoding engine against the things it promises: batch invariance, exact
branch combination, independent stopping, streaming, and adapter management."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from carve.artifact import AdapterValidationError
from carve.engine.decoding import Branch, Engine, EngineError, GenerationRequest, Sampling
from carve.engine.models import load_base, plan_load, resolve_model

# The engine's own forward (carve.engine.runner) sums in another order than Hugging Face's: on the tiny
# model's sharp logits (tens) fp32 rounding reaches a few 1e-5 in log-probabilities; a wrong rule, mask
# or adapter moves them by far more than this.
FP32_LOGPROB_ATOL = 1e-4
# bf16 weight copies round each weight to 8 significant bits: on the tiny models the first step's
# log-probabilities move by 0.01-0.05; a wrong product (a transposed or mis-cast weight) moves them by units.
BF16_LOGPROB_ATOL = 0.15

PROMPTS = [
    "The patient was treated with",
    "Gene expression",
    "Question: Is metformin used for type 2 diabetes? Answer:",
    "Revenue rose",
    "1. Instruction: Name the disease.\n1. Input: The child had measles.\n2. Instruction:",
]


ARCHITECTURES = {"llama": ("tiny_model_dir", "tiny_adapters"), "gemma3": ("tiny_gemma_dir", "tiny_gemma_adapters")}


def _model_and_adapters(request: pytest.FixtureRequest, architecture: str) -> tuple[Path, dict[str, Path]]:
    folder, adapters = ARCHITECTURES[architecture]
    return request.getfixturevalue(folder), request.getfixturevalue(adapters)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def engine(request: pytest.FixtureRequest) -> Engine:
    """The engine on its own forward (the runner), for a Llama and a Gemma 3 (sliding-window layers)."""
    folder, adapters = _model_and_adapters(request, request.param)
    model, tokenizer = load_base(resolve_model(str(folder)), plan_load(False))
    eng = Engine(model, tokenizer, base_label="tiny")
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    assert eng.forward_path() == "runner"
    return eng


def greedy(n: int = 12, stop: tuple[str, ...] = ()) -> Sampling:
    return Sampling(max_new_tokens=n, stop=stop)


def test_mixed_adapter_batch_is_token_identical_to_each_request_alone(engine: Engine) -> None:
    adapters = [None, "alpha", "beta", "gamma", "alpha"]
    requests = [GenerationRequest.single(p, a, greedy(14)) for p, a in zip(PROMPTS, adapters)]
    batched = engine.generate(requests)
    for request, together in zip(requests, batched):
        alone = engine.generate([request])[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
    # plain greedy rows take their logits' argmax, rows keeping scores the argmax of the log-softmax: the same tokens
    scored = engine.generate([GenerationRequest(r.branches, sampling=r.sampling, record_scores=True) for r in requests])
    assert [s.token_ids for s in scored] == [b.token_ids for b in batched]
    # the adapters really change the output, so the comparison above means something
    outputs = {tuple(engine.generate([GenerationRequest.single(PROMPTS[0], a, greedy(14))])[0].token_ids) for a in [None, "alpha", "beta", "gamma"]}
    assert len(outputs) == 4


def _reference_logprobs(engine: Engine, prompt: str, adapter: str | None, generated: list[int]) -> torch.Tensor:
    """One branch, alone, no padding, no KV cache: the full sequence re-run from scratch."""
    ids = torch.tensor([engine.encode(prompt) + generated])
    with torch.inference_mode():
        if adapter is None:
            with engine.model.disable_adapter():
                logits = engine.model(input_ids=ids).logits[0, -1]
        else:
            logits = engine.model(input_ids=ids, adapter_names=[adapter]).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def test_mixture_equals_brute_force_reference(engine: Engine) -> None:
    branches = (Branch(PROMPTS[0], "alpha", 0.2), Branch(PROMPTS[2], "beta", 0.5), Branch(PROMPTS[4], None, 0.3))
    request = GenerationRequest(branches, "mixture", greedy(8), record_scores=True)
    other = GenerationRequest.single(PROMPTS[1], "gamma", greedy(8))  # shares the batch, must not matter
    result = engine.generate([other, request])[1]
    assert result.step_scores is not None and len(result.step_scores) == 8
    for step, scores in enumerate(result.step_scores):
        so_far = result.token_ids[:step]
        mixture = sum(b.weight * _reference_logprobs(engine, b.prompt, b.adapter, so_far).exp() for b in branches)
        assert torch.allclose(scores.double().exp(), mixture, atol=1e-5)
        assert int(mixture.argmax()) == result.token_ids[step]


def test_contrast_equals_brute_force_reference(engine: Engine) -> None:
    alpha = 0.1
    branches = (Branch(PROMPTS[3], "beta"), Branch(PROMPTS[3], None))
    request = GenerationRequest(branches, "contrast", Sampling(max_new_tokens=8, alpha=alpha), record_scores=True)
    result = engine.generate([GenerationRequest.single(PROMPTS[0], None, greedy(3)), request])[1]
    assert result.step_scores is not None
    for step, scores in enumerate(result.step_scores):
        so_far = result.token_ids[:step]
        expert = _reference_logprobs(engine, PROMPTS[3], "beta", so_far)
        amateur = _reference_logprobs(engine, PROMPTS[3], None, so_far)
        plausible = expert.exp() >= alpha * expert.exp().max()
        finite = torch.isfinite(scores)
        assert torch.equal(finite, plausible)
        assert torch.allclose(scores.double()[plausible], (expert - amateur)[plausible], atol=FP32_LOGPROB_ATOL)
        best = torch.where(plausible, expert - amateur, torch.full_like(expert, -math.inf))
        assert int(best.argmax()) == result.token_ids[step]


def test_stop_strings_end_rows_independently(engine: Engine) -> None:
    free = engine.generate([GenerationRequest.single(PROMPTS[1], "alpha", greedy(16))])[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string, got {free.text!r}"
    stopped, untouched = engine.generate(
        [GenerationRequest.single(PROMPTS[1], "alpha", greedy(16, (stop,))), GenerationRequest.single(PROMPTS[0], "beta", greedy(16))]
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert len(stopped.token_ids) < len(free.token_ids)
    assert untouched.finish_reason == "length" and len(untouched.token_ids) == 16
    assert untouched.token_ids == engine.generate([GenerationRequest.single(PROMPTS[0], "beta", greedy(16))])[0].token_ids


def test_eos_ends_its_row_only(engine: Engine) -> None:
    first = engine.generate([GenerationRequest.single(PROMPTS[2], "gamma", greedy(10))])[0]
    other_alone = engine.generate([GenerationRequest.single(PROMPTS[3], None, greedy(10))])[0]
    eos_token = first.token_ids[3]
    assert eos_token not in other_alone.token_ids, "pick prompts whose outputs do not share this token"
    saved = set(engine.eos_ids)
    engine.eos_ids = saved | {eos_token}
    try:
        ended, other = engine.generate([GenerationRequest.single(PROMPTS[2], "gamma", greedy(10)), GenerationRequest.single(PROMPTS[3], None, greedy(10))])
    finally:
        engine.eos_ids = saved
    assert ended.finish_reason == "eos" and ended.token_ids == first.token_ids[: first.token_ids.index(eos_token) + 1]
    assert other.token_ids == other_alone.token_ids and other.finish_reason == "length"


def test_streaming_yields_the_same_text_as_generate(engine: Engine) -> None:
    free = engine.generate([GenerationRequest.single(PROMPTS[0], "alpha", greedy(20))])[0]
    stop = free.text[-4:-1] if len(free.text) > 5 else "zzz"
    requests = [
        GenerationRequest.single(PROMPTS[0], "alpha", greedy(20, (stop,))),
        GenerationRequest.single(PROMPTS[1], None, Sampling(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=7)),
        GenerationRequest((Branch(PROMPTS[2], "beta", 1.0), Branch(PROMPTS[3], "gamma", 2.0)), "mixture", greedy(10)),
    ]
    complete = engine.generate(requests)
    streamed = ["", "", ""]
    finished = [None, None, None]
    for event in engine.stream(requests):
        assert finished[event.index] is None, "no event after a request finished"
        streamed[event.index] += event.delta
        finished[event.index] = event.finish_reason
    assert streamed == [c.text for c in complete]
    assert finished == [c.finish_reason for c in complete]


def test_sampling_is_seeded_per_request(engine: Engine) -> None:
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=123)
    alone = engine.generate([GenerationRequest.single(PROMPTS[4], "beta", sampling)])[0]
    batch = engine.generate([GenerationRequest.single(PROMPTS[0], None, Sampling(max_new_tokens=5, temperature=1.0, seed=1)), GenerationRequest.single(PROMPTS[4], "beta", sampling)])
    assert batch[1].token_ids == alone.token_ids
    other_seed = engine.generate([GenerationRequest.single(PROMPTS[4], "beta", Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=124))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_bad_requests_are_refused(engine: Engine) -> None:
    with pytest.raises(EngineError, match="not loaded"):
        engine.generate([GenerationRequest.single("hi", "nope")])
    with pytest.raises(EngineError, match="exactly one branch"):
        GenerationRequest((Branch("a"), Branch("b")), "single")
    with pytest.raises(EngineError, match="two branches"):
        GenerationRequest((Branch("a"),), "contrast")
    with pytest.raises(EngineError, match="positive"):
        GenerationRequest((Branch("a", weight=0.0), Branch("b")), "mixture")
    with pytest.raises(EngineError, match="top_p"):
        Sampling(top_p=0.0)


def test_adapter_for_another_base_is_refused_and_changes_nothing(tiny_model_dir: Path, other_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    model, tokenizer = load_base(resolve_model(str(other_model_dir)), plan_load(False))
    eng = Engine(model, tokenizer, base_label="tiny-wide")
    with pytest.raises(AdapterValidationError) as info:
        eng.load_adapter("alpha", tiny_adapters["alpha"])
    message = str(info.value)
    assert "tiny-wide" in message and str(tiny_adapters["alpha"]) in message and "64" in message and "96" in message
    assert eng.adapters == [] and not hasattr(eng.model, "peft_config")


def test_load_and_unload_adapters(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    model, tokenizer = load_base(resolve_model(str(tiny_model_dir)), plan_load(False))
    eng = Engine(model, tokenizer)
    base_out = eng.generate([GenerationRequest.single(PROMPTS[0], None, greedy(8))])[0].token_ids
    eng.load_adapter("a", tiny_adapters["alpha"])
    eng.load_adapter("b", tiny_adapters["beta"])
    assert eng.adapters == ["a", "b"]
    with pytest.raises(EngineError, match="already loaded"):
        eng.load_adapter("a", tiny_adapters["gamma"])
    with_b = eng.generate([GenerationRequest.single(PROMPTS[0], "b", greedy(8))])[0].token_ids
    eng.unload_adapter("a")
    assert eng.adapters == ["b"]
    assert eng.generate([GenerationRequest.single(PROMPTS[0], "b", greedy(8))])[0].token_ids == with_b
    eng.unload_adapter("b")
    assert eng.adapters == []
    assert eng.generate([GenerationRequest.single(PROMPTS[0], None, greedy(8))])[0].token_ids == base_out
    with pytest.raises(EngineError, match="not loaded"):
        eng.unload_adapter("b")


def test_four_bit_base_on_cpu_serves_mixed_adapters(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    """bitsandbytes nf4 runs on the CPU here: the QLoRA path is exercised, not only planned."""
    plan = plan_load(False, quantize=True)
    model, tokenizer = load_base(resolve_model(str(tiny_model_dir)), plan)
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    eng = Engine(model, tokenizer)
    eng.load_adapter("alpha", tiny_adapters["alpha"])
    eng.load_adapter("beta", tiny_adapters["beta"])
    requests = [GenerationRequest.single(p, a, greedy(6)) for p, a in zip(PROMPTS, [None, "alpha", "beta"])]
    together = eng.generate(requests)
    assert [c.token_ids for c in together] == [eng.generate([r])[0].token_ids for r in requests]


def test_concatenated_lora_equals_peft_mixed_batches(tiny_model_dir: Path, tiny_adapters: dict[str, Path]) -> None:
    """The engine's concatenated-factor LoRA path gives peft's own mixed-batch results."""
    engines = []
    for multi in (True, False):
        model, tokenizer = load_base(resolve_model(str(tiny_model_dir)), plan_load(False))
        eng = Engine(model, tokenizer, multi_lora=multi)
        for name, path in tiny_adapters.items():
            eng.load_adapter(name, path)
        engines.append(eng)
    assert engines[0]._multi is not None and engines[1]._multi is None
    requests = [
        GenerationRequest(branches=(Branch(p, a),), sampling=greedy(10), record_scores=True)
        for p, a in zip(PROMPTS, [None, "alpha", "beta", "gamma", "alpha"])
    ]
    fast, reference = (eng.generate(requests) for eng in engines)
    for f, r in zip(fast, reference):
        assert f.token_ids == r.token_ids
        for a, b in zip(f.step_scores or [], r.step_scores or []):
            assert torch.allclose(a, b, atol=FP32_LOGPROB_ATOL)


@pytest.mark.parametrize("architecture,multi_lora", [("llama", True), ("llama", False), ("gemma3", True)])
def test_shared_prompt_prefix_is_prefilled_once_and_changes_nothing(request: pytest.FixtureRequest, architecture: str, multi_lora: bool) -> None:
    """k-shot prompts share their demonstrations: prefilled once per adapter, same scores as without sharing.

    On the Gemma the demonstrations are longer than its sliding window, and the
    rows' own tokens sit after padding: the window must count positions.
    """
    folder, adapters = _model_and_adapters(request, architecture)
    model, tokenizer = load_base(resolve_model(str(folder)), plan_load(False))
    eng = Engine(model, tokenizer, multi_lora=multi_lora)
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    demos = "Instruction: Name the gene.\nInput: BRCA1 rose in the samples.\nResponse: BRCA1\n\n" * 3
    queries = ["Instruction: Name the drug.\nInput: Aspirin.", "Instruction: Name it.\nInput: A much longer input sentence about IL-6 levels.\nResponse:"]
    mixture = GenerationRequest((Branch(demos + queries[0], "alpha", 0.6), Branch(demos + queries[1], None, 0.4)), "mixture", greedy(6), record_scores=True)
    requests = [GenerationRequest((Branch(demos + q, a),), sampling=greedy(6), record_scores=True) for q, a in zip(queries * 2, [None, "alpha", "beta", None])]
    requests.append(mixture)

    eng.share_prefixes = False
    plain = eng.generate(requests)
    assert eng.shared_prefix_tokens == 0
    eng.share_prefixes = True
    shared = eng.generate(requests)
    assert eng.shared_prefix_tokens >= 16 * (6 - 3)  # 6 rows, 3 distinct adapters
    for s, p in zip(shared, plain):
        assert s.token_ids == p.token_ids
        for a, b in zip(s.step_scores or [], p.step_scores or []):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite) and torch.allclose(a[finite], b[finite], atol=FP32_LOGPROB_ATOL)
    # and against a row decoded alone (no padding at all)
    alone = eng.generate([requests[1]])[0]
    assert alone.token_ids == shared[1].token_ids


def test_nucleus_from_top_k_equals_the_full_sort() -> None:
    from carve.engine.picking import nucleus_candidates

    generator = torch.Generator().manual_seed(0)
    for temperature in (0.3, 1.0, 5.0):  # peaked to nearly flat: a flat one needs the top-k widened
        probs = torch.softmax(torch.randn(5000, generator=generator) / temperature, dim=-1)
        for top_p in (0.5, 0.9, 0.98):
            top, order = nucleus_candidates(probs, top_p, first=64)
            full, full_order = torch.sort(probs, descending=True)
            nucleus = int(((torch.cumsum(full, -1) - full) < top_p).sum())
            assert len(top) >= nucleus
            assert torch.equal(order[:nucleus], full_order[:nucleus]) and torch.equal(top[:nucleus], full[:nucleus])


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_bf16_weight_copies_stay_close_to_fp32_and_leave_the_model_fp32(request: pytest.FixtureRequest, architecture: str) -> None:
    """The CPU's bf16 format: the base's products on bf16 copies, activations, LoRA and the model itself in fp32."""
    folder, adapters = _model_and_adapters(request, architecture)
    engines = {}
    for weights in ("native", "bf16"):
        model, tokenizer = load_base(resolve_model(str(folder)), plan_load(False, "fp32"))
        eng = Engine(model, tokenizer, weight_format=weights)  # type: ignore[arg-type]
        eng.load_adapter("alpha", adapters["alpha"])
        engines[weights] = eng
    requests = [GenerationRequest(branches=(Branch(p, a),), sampling=greedy(1), record_scores=True) for p, a in zip(PROMPTS, [None, "alpha"] * 3)]
    fp32, bf16 = (engines[weights].generate(requests) for weights in ("native", "bf16"))
    for a, b in zip(fp32, bf16):
        gap = float((a.step_scores[0] - b.step_scores[0]).abs().max())  # type: ignore[index]
        assert 0 < gap < BF16_LOGPROB_ATOL  # rounded (so bf16 really ran), not wrong
    assert all(p.dtype == torch.float32 for p in engines["bf16"].model.parameters())


@pytest.mark.parametrize("shared", [False, True], ids=["whole", "after-shared-prefix"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_long_prompts_of_unequal_length_run_unpadded_and_causal_as_with_the_mask(
    request: pytest.FixtureRequest, architecture: str, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long prompts skip their padding in the products and attend row by row (causal, the Gemma's window in blocks): as the masked
    square. Whole prompts from column 0, or after a prompt prefix they share, run once and cached (its keys gathered per row)."""
    from carve.engine import runner

    folder, adapters = _model_and_adapters(request, architecture)
    model, tokenizer = load_base(resolve_model(str(folder)), plan_load(False))
    eng = Engine(model, tokenizer)
    eng.load_adapter("alpha", adapters["alpha"])
    eng.share_prefixes = shared
    start = "Clinical notes of the ward, night shift. Vitals were stable overnight. " if shared else ""
    notes = [start + f"Bed {bed}: the patient, a 54 year old man with hypertension, was given metformin. " * n for bed, n in zip("ABC", (6, 3, 9))]
    requests = [GenerationRequest((Branch(note + "Name the drug:", a),), sampling=greedy(8), record_scores=True) for note, a in zip(notes, [None, "alpha", "alpha"])]
    lengths = [len(eng.encode(r.branches[0].prompt)) for r in requests]
    assert min(lengths) >= runner.CAUSAL_ROWS_MIN_TOKENS and len(set(lengths)) == 3
    calls: list[tuple[int | None, int]] = []  # (window, cached columns) of each row-by-row call
    rows_attention = runner._rows_attention
    monkeypatch.setattr(runner, "_rows_attention", lambda *a: calls.append((a[4], a[1].shape[2] - a[0].shape[2])) or rows_attention(*a))
    together = eng.generate(requests)
    assert calls and (architecture == "llama" or any(window == 8 for window, _ in calls))  # the path ran, on the Gemma over its window (8) too
    assert any(cached for _, cached in calls) == shared  # after the shared prefix's columns, when there is one
    assert [c.token_ids for c in together] == [eng.generate([r])[0].token_ids for r in requests]
    monkeypatch.setattr(runner, "CAUSAL_ROWS_MIN_TOKENS", 10**9)  # every prompt through the explicit mask instead
    masked = eng.generate(requests)
    for a, b in zip(together, masked):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.step_scores or [], b.step_scores or []):
            assert torch.allclose(x, y, atol=FP32_LOGPROB_ATOL)


def test_large_tensors_freed_on_the_cpu_are_reused_without_page_faults() -> None:
    """After keep_freed_memory (which an Engine on the CPU calls), freed 200 MB blocks serve the next ones: once the heap
    has grown to the pattern (a few rounds), no fresh pages are faulted in. By default glibc maps each anew (~48,800 faults)."""
    import resource

    from carve.engine.host_memory import keep_freed_memory

    assert keep_freed_memory()  # this machine's glibc
    size = 50_000_000  # fp32: 200 MB, far over glibc's largest mmap threshold (32 MB)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(size)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del block
    assert max(faults[-2:]) < size * 4 // 4096 // 10, faults  # a tenth of its pages at most


@pytest.mark.parametrize("shape", [(0, 48), (1, 48), (2, 48), (5, 1, 48), (256, 48), (257, 48), (3, 4, 48)])
def test_small_products_equal_f_linear(shape: tuple[int, ...]) -> None:
    """The runner's (W @ x^T)^T for few rows (a lone row padded to two) is x @ W^T in every input layout, contiguous."""
    from carve.engine.runner import linear

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(shape, generator=generator), torch.randn(96, 48, generator=generator)
    out = linear(x, weight)
    assert out.shape == (*shape[:-1], 96) and out.is_contiguous()
    assert torch.allclose(out, torch.nn.functional.linear(x, weight), atol=1e-5)
    if len(shape) == 2 and shape[0] >= 2:  # a lone row (padded) gets what it gets beside another row
        assert torch.equal(linear(x[:1], weight)[0], linear(x[:2], weight)[0])
