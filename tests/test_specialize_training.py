"""LoRA training on the tiny model: masking, resume equality, the 4-bit (QLoRA) path on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from carve.engine.templates import Demonstration, alpaca_prompt, kshot_prompt
from carve.specialize.config import TrainingConfig
from carve.specialize.training import IGNORE, _collate, encode_example, response_loss, train_lora

EXAMPLES = [
    {"instruction": "Name the gene.", "input": "BRCA1 was measured.", "output": "BRCA1"},
    {"instruction": "Is metformin used for diabetes?", "input": "", "output": "yes"},
    {"instruction": "Name the disease.", "input": "The child had measles.", "output": "measles"},
    {"instruction": "Which drug was given?", "input": "The patient was treated with aspirin.", "output": "aspirin"},
    {"instruction": "Summarize.", "input": "Revenue rose 12 percent.", "output": "revenue rose"},
    {"instruction": "Name the tissue.", "input": "Breast cancer tissue samples.", "output": "breast tissue"},
]
CONFIG = TrainingConfig(epochs=2, batch_size=4, micro_batch_size=2, max_length=400, save_every_steps=1, lora_dropout=0.1)


def test_loss_only_on_response_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = encode_example(tokenizer, "Name the gene.", "BRCA1 was measured.", "BRCA1", 400)
    assert encoded is not None
    prompt_len = len(tokenizer(alpaca_prompt("Name the gene.", "BRCA1 was measured."))["input_ids"])
    assert encoded.labels[:prompt_len] == [IGNORE] * prompt_len
    assert encoded.labels[prompt_len:] == encoded.input_ids[prompt_len:]
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.input_ids[prompt_len:-1]) == "BRCA1"
    assert encode_example(tokenizer, "Name the gene.", "x " * 300, "BRCA1", 64) is None


def test_response_loss_equals_the_full_logits_loss_on_padded_batches(tiny_model_dir: Path) -> None:
    """Projecting only the learned positions changes nothing: same loss, same gradient as transformers' full-logits loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    encoded = [encode_example(tokenizer, e["instruction"], e["input"], e["output"], 400) for e in EXAMPLES[:3]]
    micro = _collate([e for e in encoded if e is not None], int(tokenizer.pad_token_id))  # three lengths: right padding differs per row

    kept = response_loss(model, micro)
    kept.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    # the reference: transformers' own causal-LM loss over full logits (a mean over the learned tokens)
    reference = model(**micro).loss * int((micro["labels"][:, 1:] != IGNORE).sum())
    reference.backward()
    assert kept.item() == pytest.approx(reference.item(), rel=1e-5) and reference.item() > 0
    assert torch.allclose(grad, model.lm_head.weight.grad, atol=1e-6)


def test_demonstrations_come_before_the_prompt_and_are_dropped_to_fit(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    demos = [Demonstration("Name the gene.", "TP53 was mutated.", "TP53"), Demonstration("Name the gene.", "EGFR " * 60, "EGFR")]
    query = ("Name the gene.", "BRCA1 was measured.", "BRCA1")
    both = encode_example(tokenizer, *query, 4000, demos)
    assert both is not None
    prompt = kshot_prompt(demos, *query[:2])
    prompt_len = len(tokenizer(prompt)["input_ids"])
    assert both.input_ids[:prompt_len] == tokenizer(prompt)["input_ids"]
    # the demonstrations' answers are context, not targets: only the query's response is learned
    assert both.labels[:prompt_len] == [IGNORE] * prompt_len
    assert tokenizer.decode(both.input_ids[prompt_len:-1]) == "BRCA1"
    # too long for both: the last demonstration goes, and the whole response still fits
    one_len = len(tokenizer(kshot_prompt(demos[:1], *query[:2]))["input_ids"])
    fitted = encode_example(tokenizer, *query, one_len + 10, demos)
    assert fitted is not None and len(fitted.input_ids) <= one_len + 10
    assert fitted.input_ids[:one_len] == tokenizer(kshot_prompt(demos[:1], *query[:2]))["input_ids"]
    assert fitted.input_ids[-1] == tokenizer.eos_token_id


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_interrupted_training_resumes_to_the_same_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    full = train_lora(tiny_model_dir, EXAMPLES, CONFIG, tmp_path / "full", seed=7)
    assert full.steps == 4 and full.resumed_from_step == 0 and full.final_loss is not None
    # a session stopped after its second optimizer step (as a kill after that checkpoint leaves it)
    partial = tmp_path / "partial"
    stopped = train_lora(tiny_model_dir, EXAMPLES, CONFIG, partial, seed=7, stop_after_steps=2)
    assert not (partial / "final").exists() and stopped.losses == full.losses[:2]
    resumed = train_lora(tiny_model_dir, EXAMPLES, CONFIG, partial, seed=7)
    assert resumed.resumed_from_step == 2 and resumed.losses == full.losses
    a, b = _weights(full.adapter_dir), _weights(resumed.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it trained


def test_continuing_an_adapter_trains_at_the_continue_rate(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    one_epoch = CONFIG.model_copy(update={"epochs": 1, "learning_rate": 1e-2})
    start = train_lora(tiny_model_dir, EXAMPLES, one_epoch, tmp_path / "start", seed=7).adapter_dir
    gentle = one_epoch.model_copy(update={"continue_learning_rate": 1e-4})
    assert (gentle.rate(continuing=False), gentle.rate(continuing=True), one_epoch.rate(continuing=True)) == (1e-2, 1e-4, 1e-2)
    continued = train_lora(tiny_model_dir, EXAMPLES, gentle, tmp_path / "continued", seed=8, init_adapter=start).adapter_dir
    same = train_lora(tiny_model_dir, EXAMPLES, one_epoch.model_copy(update={"learning_rate": 1e-4}), tmp_path / "same", seed=8, init_adapter=start).adapter_dir
    fast = train_lora(tiny_model_dir, EXAMPLES, one_epoch, tmp_path / "fast", seed=8, init_adapter=start).adapter_dir
    a, b, c, s = _weights(continued), _weights(same), _weights(fast), _weights(start)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the continue rate is the rate a continuation trains at
    moved = {name: sum(float((w[k] - s[k]).abs().sum()) for k in s) for name, w in (("gentle", a), ("fast", c))}
    assert 0 < moved["gentle"] < moved["fast"]  # and it moves the adapter less than the fresh rate would


def test_qlora_plan_and_step_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from carve.engine.models import plan_load

    cuda_plan = plan_load(True)
    assert cuda_plan.quantize_4bit and cuda_plan.compute_dtype == "bf16"
    assert not plan_load(False).quantize_4bit
    config = TrainingConfig(epochs=1, batch_size=2, micro_batch_size=2, max_length=400)
    result = train_lora(tiny_model_dir, EXAMPLES[:2], config, tmp_path / "qlora", seed=0, quantize=True)
    assert result.steps == 1 and result.final_loss is not None and result.final_loss > 0
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
