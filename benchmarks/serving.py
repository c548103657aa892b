"""Serving benchmark: mixed-adapter batching against base-only and against a naive per-request server.

A closed loop keeps ``--concurrency`` streaming chat requests in flight (each
asks for ``--max-tokens`` new tokens) against a local Carve server on
SmolLM2-135M-Instruct, spreading the requests over 1, 4 and 8 LoRA adapters,
and over the base model only. In the same run a naive server (one peft model,
``set_adapter`` + ``generate`` per request under a lock) gets the same load
over the 8 adapters. The 8 adapters are made here: random LoRA weights, r=8 on
all linear modules.

Run under the offline wrapper (it starts Ray):
    ../shared/tools/offline .venv/bin/python benchmarks/serving.py

Last line: ``RESULT a8_vs_base=<ratio> a8_vs_naive=<ratio> p99_ms=<ms>`` (p99 of
the 8-adapter run). Targets: a8_vs_base >= 0.8, a8_vs_naive >= 3.
"""

# No `from __future__ import annotations`: the naive server's FastAPI handler needs real annotations.
import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import make_random_adapters  # noqa: E402

TOPICS = [
    "the history of the printing press", "how vaccines train the immune system", "a day in the life of a lighthouse keeper",
    "why the sky is blue", "the rules of chess", "how interest rates affect mortgages", "the water cycle",
    "a trip to the mountains", "how a bill becomes a law", "the life cycle of a star", "how bread rises",
    "the causes of the first world war", "how to train for a marathon", "what DNA does in a cell", "the stock market",
    "a robot learning to paint",
]


@dataclass
class Run:
    """One load level's measurements."""

    label: str
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    first_error: str = ""
    elapsed: float = 0.0

    @property
    def throughput(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."}]


async def carve_request(client: Any, model: str, i: int, max_tokens: int, run: Run) -> None:
    """One streaming chat request: time to first token, latency, completion tokens."""
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            run.errors += 1
            run.first_error = run.first_error or (await response.aread()).decode()[:300]
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                run.tokens += chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    run.latencies.append(time.perf_counter() - started)
    run.first_tokens.append(first if first is not None else run.latencies[-1])
    run.requests += 1


async def naive_request(client: Any, model: str, i: int, max_tokens: int, run: Run) -> None:
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens}
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        run.errors += 1
        run.first_error = run.first_error or response.text[:300]
        return
    run.latencies.append(time.perf_counter() - started)
    run.first_tokens.append(run.latencies[-1])  # no streaming: the first token comes with the last
    run.tokens += response.json()["usage"]["completion_tokens"]
    run.requests += 1


async def closed_loop(url: str, models: list[str], label: str, concurrency: int, max_tokens: int, per_client: int, deadline_s: float | None, naive: bool = False) -> Run:
    """``concurrency`` clients, each sending its next request when the previous one ends.

    Each client sends ``per_client`` requests, or (with ``deadline_s``) keeps
    sending until the deadline; throughput counts tokens of finished requests
    over the time until the last one finished (requests still running at a
    deadline are abandoned and not counted).
    """
    import httpx

    run = Run(label)
    send = naive_request if naive else carve_request
    counter = iter(range(10**9))
    started = time.perf_counter()
    last_done = [started]

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        sent = 0
        while (deadline_s is None and sent < per_client) or (deadline_s is not None and time.perf_counter() - started < deadline_s):
            i = next(counter)
            await send(client, models[i % len(models)], i, max_tokens, run)
            last_done[0] = time.perf_counter()
            sent += 1

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        tasks = [asyncio.create_task(client_loop(client, w)) for w in range(concurrency)]
        if deadline_s is None:
            await asyncio.gather(*tasks)
        else:
            await asyncio.wait(tasks, timeout=deadline_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    run.elapsed = last_done[0] - started
    return run


def naive_app(model_dir: str, adapters: dict[str, str], threads: int) -> Any:
    """The baseline: one peft model, per request set_adapter + generate, one request at a time."""
    import threading

    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="NaiveServer", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class NaiveServer:
        def __init__(self) -> None:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.set_num_threads(threads)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            names = list(adapters)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            self.model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(adapters[name], adapter_name=name)
            self.model.eval()
            self.lock = threading.Lock()

        def _generate(self, model: str, prompt: str, max_tokens: int) -> tuple[str, int, int]:
            import torch

            ids = self.tokenizer(prompt, return_tensors="pt")
            with self.lock, torch.inference_mode():
                self.model.set_adapter(model)
                out = self.model.generate(
                    **ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            new = out[0, ids["input_ids"].shape[1]:]
            return self.tokenizer.decode(new, skip_special_tokens=True), int(ids["input_ids"].shape[1]), int(new.shape[0])

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict:
            body = await request.json()
            prompt = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
            text, prompt_tokens, completion_tokens = await asyncio.to_thread(self._generate, body["model"], prompt, int(body["max_tokens"]))
            return {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}

    return NaiveServer.bind()


def table(runs: list[Run]) -> str:
    lines = [f"{'load':<22} {'req':>4} {'err':>4} {'tok/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'ttft p50':>9} {'ttft p99':>9}"]
    for r in runs:
        lines.append(
            f"{r.label:<22} {r.requests:>4} {r.errors:>4} {r.throughput:>8.1f} {r.pct(r.latencies, .5):>9.0f} {r.pct(r.latencies, .99):>9.0f} "
            f"{r.pct(r.first_tokens, .5):>9.0f} {r.pct(r.first_tokens, .99):>9.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=1, help="requests per client for each Carve load level")
    parser.add_argument("--naive-seconds", type=float, default=90.0, help="how long the naive server is measured")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (more than 1 collapses on a busy shared machine)")
    parser.add_argument("--batch-wait", type=float, default=1.0, help="seconds a Carve batch waits to fill (the gateway forwards a burst of 32 over ~1 s here)")
    args = parser.parse_args()

    from carve.adapters.registry import Registry
    from carve.common.paths import model_cache_dir
    from carve.engine.models import resolve_model
    from carve.platform.launcher import start_local_server, stop_local_server

    resolved = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="carve-bench-") as tmp:
        # Adapters and registry are temporary; the converted base model stays where it is.
        os.environ["CARVE_MODEL_CACHE"] = str(model_cache_dir())
        os.environ["CARVE_HOME"] = tmp
        # Ray runs its workers at niceness 15; on a shared machine that measures the scheduler, not the server.
        os.environ.setdefault("RAY_worker_niceness", "0")
        adapters = make_random_adapters(resolved.path, [f"dom{i}" for i in range(8)], Path(tmp) / "adapters")
        registry = Registry(Path(tmp) / "registry")
        for name, path in adapters.items():
            registry.add(path, name, base=resolved)
        names = list(adapters)
        started = time.perf_counter()
        handle = start_local_server(
            args.model, registry.root, 0, max_adapters=8, num_cpus=os.cpu_count() or 2,
            engine_num_cpus=0, engine_threads=args.threads, max_batch_size=args.concurrency, batch_wait_s=args.batch_wait,
        )
        print(f"server up in {time.perf_counter() - started:.0f}s at {handle.url}", flush=True)
        try:
            from ray import serve

            # The naive server first, then removed: its abandoned queue must not eat the CPU of the next runs.
            serve.run(naive_app(str(resolved.path), {n: str(p) for n, p in adapters.items()}, args.threads), name="naive", route_prefix="/naive")
            naive_url = handle.url + "/naive"
            warm = asyncio.run(closed_loop(naive_url, names, "warmup", 1, 2, 1, None, naive=True))
            if warm.errors:
                raise SystemExit(f"the naive server fails: {warm.first_error}")
            runs: list[Run] = [asyncio.run(closed_loop(naive_url, names, "naive, 8 adapters", args.concurrency, args.max_tokens, 0, args.naive_seconds, naive=True))]
            print(table(runs).splitlines()[-1], flush=True)
            serve.delete("naive")
            for label, models in [("base only", ["base"]), ("1 adapter", names[:1]), ("4 adapters", names[:4]), ("8 adapters", names)]:
                # Warm up: load this level's adapters (a cold load is not what we measure).
                asyncio.run(closed_loop(handle.url, models, "warmup", len(models), 2, 1, None))
                runs.append(asyncio.run(closed_loop(handle.url, models, label, args.concurrency, args.max_tokens, args.per_client, None)))
                print(table(runs[-1:]).splitlines()[-1], flush=True)
        finally:
            stop_local_server()

    for r in runs:
        if r.errors:
            print(f"{r.label}: {r.errors} errors, first: {r.first_error}")
    by_label = {r.label: r for r in runs}
    a8, base, naive = by_label["8 adapters"], by_label["base only"], by_label["naive, 8 adapters"]
    print()
    print(f"closed loop: {args.concurrency} requests in flight, {args.max_tokens} new tokens each, {args.model}, {args.threads} torch threads")
    print(table(runs))
    print(f"RESULT a8_vs_base={a8.throughput / base.throughput:.2f} a8_vs_naive={a8.throughput / naive.throughput:.2f} p99_ms={a8.pct(a8.latencies, .99):.0f}")


if __name__ == "__main__":
    main()
