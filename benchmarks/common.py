"""Helpers every benchmark shares: random LoRA adapters for a real base, timing, charts, output folder."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

OUT_DIR = Path(os.environ.get("CARVE_BENCH_OUT", Path(__file__).parent / "out"))


def make_random_adapters(model_dir: Path, names: list[str], out_dir: Path, rank: int = 8, seed: int = 0) -> dict[str, Path]:
    """LoRA adapters (all linear layers, r=rank) with random non-zero weights, saved as PEFT folders.

    Random B (peft initialises it to zero) makes every adapter change the output,
    so a benchmark pays the real cost of distinct adapters.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    paths: dict[str, Path] = {}
    for name in names:
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        paths[name] = out_dir / name
        peft_model.save_pretrained(paths[name])
    return paths


class StreamTimes(NamedTuple):
    """One ``engine.stream`` run: the prefill (start to first token), the decode (first token to last) and its steps."""

    prefill_s: float
    decode_s: float
    steps: int  # decode steps after the first token (row 0's tokens less one)


def timed_stream(engine: Any, requests: list[Any], on_first: Callable[[], None] = lambda: None) -> StreamTimes:
    """Stream ``requests`` through ``engine`` and time it; ``on_first`` runs as the first token arrives (the prefill is over)."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for event in engine.stream(requests):
        if not first:
            on_first()
        last = time.perf_counter()
        first = first or last
        tokens += event.index == 0
    return StreamTimes(first - start, last - first, tokens - 1)


@contextmanager
def timer() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds after the block."""
    box = [0.0]
    start = time.perf_counter()
    yield box
    box[0] = time.perf_counter() - start


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(labels, values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
