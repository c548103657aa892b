"""Ablation for issue 4: the quick profile's LoRA training on the seeds alone, no synthetic data.

Self-specialization should beat plain fine-tuning on the seeds it started
from; this trains that baseline with exactly the quick profile's training
settings, so `carve eval` can put it beside the quick-profile adapter.

    .venv/bin/python docs/results/seeds_only.py smollm2-135m-instruct runs/seeds-only
    # the adapter is runs/seeds-only/final
"""

from __future__ import annotations

import sys
from pathlib import Path

from carve.engine.models import resolve_model
from carve.specialize.config import build_config
from carve.specialize.run import seed_examples
from carve.specialize.seeds import load_seed_set
from carve.specialize.training import train_lora


def main(base: str, out: Path, seeds: Path = Path("seeds/biomedical")) -> None:
    config = build_config("quick", base=base)
    seed_set = load_seed_set(seeds)
    result = train_lora(resolve_model(base).path, seed_examples(seed_set, config.seed_demonstrations), config.training, out, config.seed)
    print(f"{result.examples} examples ({result.skipped_too_long} too long), {result.steps} steps, loss {result.losses[0]:.3f} -> {result.final_loss:.3f}")
    print(f"adapter: {result.adapter_dir}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], Path(sys.argv[2]), *(Path(a) for a in sys.argv[3:]))
