"""The paper's Table 2 redone at 135M-270M (issue 16): every variant's token F1 gain over its own seeds-only adapter.

Reads the `carve eval` results kept in docs/results (each variant paired against the
seeds-only adapter of the same run, in the same evaluation), prints one markdown
table and draws the gains with their 95% paired bootstrap intervals, k=0 and k=5:

    .venv/bin/python docs/results/table2.py        # writes docs/results/table2.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).parent


class Variant(NamedTuple):
    folder: str  # docs/results/<folder>/results.json
    model: str  # the variant's label in that evaluation
    seeds_only: str  # the seeds-only adapter's label there
    name: str  # what the variant is, for the table and the chart


VARIANTS = [
    Variant("eval-smollm2-levers-limit40", "quick", "seeds-only", "SmolLM2 biomed: retrieval top-5 marginalized (committed)"),
    Variant("eval-smollm2-levers-limit40", "top1", "seeds-only", "SmolLM2 biomed: retrieval top-1"),
    Variant("eval-smollm2-levers-limit40", "none", "seeds-only", "SmolLM2 biomed: no retrieval"),
    Variant("eval-smollm2-levers-limit40", "grounded", "seeds-only", "SmolLM2 biomed: corpus-grounded instances"),
    Variant("eval-gemma3-seedsonly-limit40", "g3-quick", "g3-seeds-only", "gemma3 biomed: retrieval top-5 marginalized (committed)"),
    Variant("eval-fin-gemma3-limit100", "g3fin-quick", "g3fin-seeds-only", "gemma3 finance: retrieval top-5 marginalized (committed)"),
    Variant("eval-fin-smollm2-limit100", "fin-quick", "fin-seeds-only", "SmolLM2 finance: retrieval top-5 marginalized (committed)"),
    Variant("eval-fin-smollm2-limit100", "fin-none", "fin-seeds-only", "SmolLM2 finance: no retrieval"),
    Variant("eval-fin-same-smollm2-limit100", "fin-iter2", "fin-seeds-only", "SmolLM2 finance: iteration 2, fresh instructions"),
    Variant("eval-fin-same-smollm2-limit100", "fin-iter2-same", "fin-seeds-only", "SmolLM2 finance: iteration 2, same instructions"),
]


def gains(variant: Variant) -> dict[int, tuple[float, float, float]]:
    """k -> (gain, low, high) of the variant's macro token F1 over its seeds-only adapter."""
    results = json.loads((HERE / variant.folder / "results.json").read_text())
    return {
        g["k"]: (g["gain"], g["low"], g["high"])
        for g in results["gains"]
        if g["model"] == variant.model and g["baseline"] == variant.seeds_only and g["metric"] == "f1"
    }


def main() -> None:
    rows = [(variant, gains(variant)) for variant in VARIANTS]
    print("| variant | k=0 vs seeds-only | k=5 vs seeds-only | source |")
    print("|---|---|---|---|")
    for variant, by_k in rows:
        cells = [f"{g:+.2f} [{lo:+.2f}, {hi:+.2f}]" for g, lo, hi in (by_k[0], by_k[5])]
        print(f"| {variant.name} | {cells[0]} | {cells[1]} | {variant.folder} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(rows) + 2), sharey=True)
    for axis, k in zip(axes, (0, 5)):
        for y, (variant, by_k) in enumerate(rows):
            gain, low, high = by_k[k]
            color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
            axis.errorbar(gain, y, xerr=[[gain - low], [high - gain]], fmt="o", color=color, capsize=3)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.axvline(3, color="tab:blue", linewidth=0.8, linestyle="--")
        axis.set_title(f"k={k}")
        axis.set_xlabel("macro token F1 over seeds-only, 95% interval")
    axes[0].set_yticks(range(len(rows)), [variant.name for variant, _ in rows])
    fig.suptitle("Generated data against the seeds alone (green: above, red: below; dashed: issue 16's +3 bar)")
    axes[0].invert_yaxis()
    fig.tight_layout()
    out = HERE / "table2.png"
    fig.savefig(out, dpi=110)
    print(f"\nchart: {out}")


if __name__ == "__main__":
    main()
