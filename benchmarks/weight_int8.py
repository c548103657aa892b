"""Weight-only int8 products on this CPU against fp32, on SmolLM2-135M's linear shapes.

A lever issue 17 weighed: weights as int8 with per-output-channel scales, activations kept in fp32
(``torch._weight_int8pack_mm``), would read a quarter of the bytes per decoding step and stay closer to
the fp32 answers than int8 activations do. This times the kernel against the fp32 product at B = 1, 16, 64
(best of up to 50 after 5 warm-ups) and prints the ratio; no model is loaded.

Run: .venv/bin/python benchmarks/weight_int8.py [--threads 2]
Last line: ``RESULT b1_fp32_over_int8=<geometric mean over shapes at B=1> b16_fp32_over_int8=<same at B=16>``
(above 1: the int8 kernel is faster).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

SHAPES = {"q/k/v fused": (1728, 576), "gate/up fused": (3072, 576), "down": (576, 1536), "output projection": (49152, 576)}
BATCHES = (1, 16, 64)


def best_ms(run: Callable[[], Any], repeats: int = 50, budget_s: float = 2.0) -> float:
    """The best time of up to ``repeats`` runs after 5 warm-ups (at least 3, fewer when they pass ``budget_s``)."""
    for _ in range(5):
        run()
    best, spent, done = math.inf, 0.0, 0
    while done < repeats and (done < 3 or spent < budget_s):
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
        best, spent, done = min(best, took), spent + took, done + 1
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ratios: dict[int, list[float]] = {b: [] for b in BATCHES}
    print(f"{'product':<18} {'[out, in]':>12} {'B':>3} {'fp32 ms':>9} {'int8 ms':>9} {'fp32/int8':>9} {'max abs err':>11}")
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features)
        scales = weight.abs().amax(dim=1) / 127
        quantized = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        for b in BATCHES:
            x = torch.randn(b, in_features)
            fp32 = best_ms(lambda: x @ weight.t())
            int8 = best_ms(lambda: torch._weight_int8pack_mm(x, quantized, scales))
            error = (torch._weight_int8pack_mm(x, quantized, scales) - x @ weight.t()).abs().max().item()
            ratios[b].append(fp32 / int8)
            print(f"{name:<18} {str([out_features, in_features]):>12} {b:3d} {fp32:9.3f} {int8:9.3f} {fp32 / int8:9.2f} {error:11.3g}")

    def geomean(values: list[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values))

    print(f"RESULT b1_fp32_over_int8={geomean(ratios[1]):.3f} b16_fp32_over_int8={geomean(ratios[16]):.3f}")


if __name__ == "__main__":
    main()
