"""Stage 4: specialization (paper §3.4): LoRA on the generated examples, resumable.

A plain torch loop: the Alpaca prompt (templates.kshot_prompt: the example's
demonstrations, if it has any, then its own prompt) followed by the response
and EOS, loss on the response tokens only, AdamW at a constant learning rate,
the effective batch reached by gradient accumulation (the loss is normalised
by the response tokens of the whole effective batch, so accumulating equals
one big batch). On CUDA the base is loaded in 4-bit nf4
(QLoRA, peft's prepare_model_for_kbit_training).

Checkpoints (adapter weights, optimizer, step, RNG state) are written at the
end of every epoch and every ``save_every_steps`` optimizer steps, each to a
temporary folder renamed into place. The example order of an epoch is a
permutation seeded by (run seed, epoch), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from carve.common.progress import stage
from carve.engine.templates import Demonstration, kshot_prompt
from carve.specialize.config import TrainingConfig
from carve.specialize.generate_instructions import derive_seed

IGNORE = -100
STATE = "trainer_state.json"
FINAL = "final"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TrainResult:
    adapter_dir: Path
    examples: int
    skipped_too_long: int
    steps: int
    epochs: int
    final_loss: float | None
    losses: list[float]
    seconds: float
    examples_per_second: float | None
    resumed_from_step: int


def encode_example(
    tokenizer: Any, instruction: str, input: str, output: str, max_length: int, demos: Sequence[Demonstration] = ()
) -> Encoded | None:
    """Prompt + response + EOS with the prompt masked out; None when the prompt alone is too long.

    Demonstrations that would not leave room for the whole response are dropped,
    the last one first, as k-shot evaluation drops them (eval_prompts.PromptFitter).
    """
    response_ids = list(tokenizer(output.strip(), add_special_tokens=False)["input_ids"]) + [int(tokenizer.eos_token_id)]
    shown = list(demos)
    while True:
        prompt_ids = list(tokenizer(kshot_prompt(shown, instruction, input))["input_ids"])
        if not shown or len(prompt_ids) + len(response_ids) <= max_length:
            break
        shown.pop()
    if len(prompt_ids) + 8 > max_length:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return Encoded(ids, labels)


def _collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):  # right padding: training needs no cache
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def response_loss(model: Any, micro: dict[str, Any]) -> Any:
    """Summed cross-entropy of a micro-batch's response tokens (labels other than IGNORE).

    Only the positions that predict a learned token go through the vocabulary
    projection (``logits_to_keep`` as a boolean mask): a k-shot seed is ~400
    prompt tokens for ~20 learned ones, and full logits were most of the memory.
    """
    import torch

    targets = micro["labels"][:, 1:]
    learned = torch.zeros_like(micro["labels"], dtype=torch.bool)
    learned[:, :-1] = targets != IGNORE
    logits = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"], logits_to_keep=learned).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[learned[:, :-1]], reduction="sum")


def _latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def _save_checkpoint(model: Any, optimizer: Any, folder: Path, state: dict[str, Any], keep: int = 2) -> None:
    import torch

    target = folder / f"step-{state['global_step']:06d}"
    if target.exists():
        return
    staging = folder / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / "adapter")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(torch.get_rng_state(), staging / "rng.pt")
    (staging / STATE).write_text(json.dumps(state, indent=2))
    os.replace(staging, target)
    for old in sorted(p for p in folder.glob("step-*") if (p / STATE).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_for_training(base_path: Path, quantize: bool | None = None) -> tuple[Any, Any, Any]:
    """The base model ready for LoRA training (4-bit + kbit preparation on CUDA) and its plan."""
    import torch

    from carve.engine.models import load_base, plan_load, resolve_model

    plan = plan_load(torch.cuda.is_available(), quantize=quantize)
    model, tokenizer = load_base(resolve_model(str(base_path)), plan)
    if plan.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.device == "cuda")
    return model, tokenizer, plan


def train_lora(
    base_path: Path,
    examples: Sequence[dict[str, Any]],
    config: TrainingConfig,
    folder: Path,
    seed: int,
    init_adapter: Path | None = None,
    quantize: bool | None = None,
    label: str = "training",
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train (or resume training) a LoRA adapter; the finished adapter is ``folder/final``.

    ``stop_after_steps`` ends early after that many optimizer steps, with a
    checkpoint and no final adapter: a time-boxed session the next call resumes.
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    torch.manual_seed(derive_seed(seed, "lora-init"))
    model, tokenizer, _plan = load_for_training(base_path, quantize)
    if init_adapter is not None:  # stage 4 continues the seed adapter, iteration 2 the first iteration's
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)

    encoded = [
        encode_example(tokenizer, e["instruction"], e["input"], e["output"], config.max_length, [Demonstration(**d) for d in e.get("demos", ())])
        for e in examples
    ]
    data = [e for e in encoded if e is not None]
    skipped = len(encoded) - len(data)
    if not data:
        raise ValueError("no training example fits max_length; nothing to train on")
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.rate(init_adapter is not None), weight_decay=0.0)

    global_step, losses = 0, []
    latest = _latest_checkpoint(checkpoints)
    if latest is not None:
        state = json.loads((latest / STATE).read_text())
        weights = load_file(str(latest / "adapter" / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights, adapter_name="default")
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt"))
        torch.set_rng_state(torch.load(latest / "rng.pt"))
        global_step, losses = state["global_step"], state["losses"]
    resumed_from = global_step
    pad_id = int(tokenizer.pad_token_id)
    model.train()
    started = time.monotonic()
    trained_examples = 0

    def seen(step: int) -> int:  # examples consumed by the first ``step`` optimizer steps
        epochs, rest = divmod(step, steps_per_epoch)
        return epochs * len(data) + min(rest * config.batch_size, len(data))

    end = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
    with stage(label, config.epochs * len(data), "examples") as progress:
        progress.resumed(seen(global_step))
        while global_step < end:
            epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))).tolist()
            batch = [data[i] for i in order[step_in_epoch * config.batch_size : (step_in_epoch + 1) * config.batch_size]]
            # Micro-batches of similar lengths pad less; the summed gradient of the step is the same.
            batch.sort(key=lambda e: len(e.input_ids))
            tokens = sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for start in range(0, len(batch), config.micro_batch_size):
                loss = response_loss(model, _collate(batch[start : start + config.micro_batch_size], pad_id)) / max(tokens, 1)
                loss.backward()
                step_loss += float(loss.detach())
            optimizer.step()
            global_step += 1
            losses.append(round(step_loss, 5))
            trained_examples += len(batch)
            progress.advance(len(batch), note=f"epoch {epoch + 1}/{config.epochs} loss {step_loss:.3f}")
            epoch_done = global_step % steps_per_epoch == 0
            if epoch_done or global_step == end or (config.save_every_steps and global_step % config.save_every_steps == 0):
                _save_checkpoint(model, optimizer, checkpoints, {"global_step": global_step, "epoch": global_step / steps_per_epoch, "losses": losses})

    seconds = time.monotonic() - started
    final = folder / FINAL
    if global_step < total_steps:
        final = folder / "checkpoints" / f"step-{global_step:06d}" / "adapter"
    elif not (final / "adapter_model.safetensors").is_file():
        staging = folder / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        os.replace(staging, final)
    return TrainResult(
        adapter_dir=final,
        examples=len(data),
        skipped_too_long=skipped,
        steps=total_steps,
        epochs=config.epochs,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        seconds=seconds,
        examples_per_second=trained_examples / seconds if trained_examples and seconds > 0 else None,
        resumed_from_step=resumed_from,
    )
