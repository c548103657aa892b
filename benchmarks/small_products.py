"""A decode step's linear products at few rows: ``F.linear(x, W)`` against ``(W @ x^T)^T``, the form the runner uses.

Run: .venv/bin/python benchmarks/small_products.py [--model gemma3-270m]

One step = every linear layer's product and the output projection, each on its
own random fp32 weight of the model's shape (so the weights come from memory,
as in decoding, not from cache), for B = 1, 2, 4, 16, 64 rows. The runner's
form (``carve.engine.runner.linear``: a lone row padded to two) against
``F.linear``, alternated; best of ``--repeats``. Prints ms per step and the
weight bytes read per second, then
``RESULT b1_speedup=.. b16_speedup=.. b64_speedup=..``.

``--other-kernels`` then times two other CPU kernels on the same step (after
the pair above, numpy last, as OpenBLAS's threads keep spinning after a call):
MKL's packed product (``cblas_sgemm_pack`` once per weight and row count,
through ``torch.ops.mkl._mkl_linear``, the kernel inductor's freezing uses) and
numpy's ``W @ x.T`` (OpenBLAS), and adds ``b1_other_vs_runner`` and
``b16_other_vs_runner`` (the faster other kernel's time over the runner's; above
1: the runner's form stays faster).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--other-kernels", action="store_true", help="also MKL's packed product and numpy's (OpenBLAS) on the same step")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig

    from carve.engine.models import resolve_model
    from carve.engine.runner import linear

    config = AutoConfig.from_pretrained(resolve_model(args.model).path)
    config = getattr(config, "text_config", config)
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [(q + 2 * kv, hidden), (hidden, q), (2 * inner, hidden), (hidden, inner)]  # fused q/k/v, o, fused gate/up, down
    weights = [torch.randn(n, k) * 0.02 for _ in range(config.num_hidden_layers) for n, k in layer]
    weights.append(torch.randn(config.vocab_size, hidden) * 0.02)
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"{args.model}: {len(weights)} products, {megabytes:.0f} MB of fp32 weights per step, {torch.get_num_threads()} torch threads")

    def step_seconds(product: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"], rows: int) -> float:
        inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
        start = time.perf_counter()
        for w in weights:
            product(inputs[w.shape[1]], w)
        return time.perf_counter() - start

    speedup, runner_seconds = {}, {}
    for rows in (1, 2, 4, 16, 64):
        best = {"F.linear": float("inf"), "runner": float("inf")}
        for _ in range(args.repeats):
            for name, product in (("F.linear", F.linear), ("runner", linear)):
                best[name] = min(best[name], step_seconds(product, rows))
        speedup[rows], runner_seconds[rows] = best["F.linear"] / best["runner"], best["runner"]
        print(f"B={rows:3d}: F.linear {1000 * best['F.linear']:7.1f} ms ({megabytes / 1000 / best['F.linear']:5.1f} GB/s), "
              f"(W @ x^T)^T {1000 * best['runner']:7.1f} ms ({megabytes / 1000 / best['runner']:5.1f} GB/s): {speedup[rows]:.2f}x")
    result = f"RESULT b1_speedup={speedup[1]:.3f} b16_speedup={speedup[16]:.3f} b64_speedup={speedup[64]:.3f}"
    if args.other_kernels:
        others = other_kernels(weights, args.repeats, megabytes, runner_seconds)
        result += f" b1_other_vs_runner={others[1]:.3f} b16_other_vs_runner={others[16]:.3f}"
    print(result)


def other_kernels(weights: list["torch.Tensor"], repeats: int, megabytes: float, runner_seconds: dict[int, float]) -> dict[int, float]:
    """Time MKL's packed product and numpy's (OpenBLAS) on the step; the faster one's time over the runner's, by rows."""
    import torch

    ratio = {}
    for rows in (1, 2, 4, 16):
        inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        best = {"MKL packed": float("inf"), "numpy (OpenBLAS)": float("inf")}
        for _ in range(repeats):
            start = time.perf_counter()
            for w, p in zip(weights, packed):
                torch.ops.mkl._mkl_linear(inputs[w.shape[1]], p, w, None, rows)
            best["MKL packed"] = min(best["MKL packed"], time.perf_counter() - start)
        del packed
        arrays = [(w.numpy(), inputs[w.shape[1]].numpy().T.copy()) for w in weights]
        for _ in range(repeats):
            start = time.perf_counter()
            for w, x in arrays:
                w @ x
            best["numpy (OpenBLAS)"] = min(best["numpy (OpenBLAS)"], time.perf_counter() - start)
        ratio[rows] = min(best.values()) / runner_seconds[rows]
        print(f"B={rows:3d}: " + ", ".join(f"{name} {1000 * t:7.1f} ms ({megabytes / 1000 / t:5.1f} GB/s)" for name, t in best.items())
              + f"; the faster over the runner's {ratio[rows]:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
