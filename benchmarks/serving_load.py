"""Open-loop serving benchmark: continuous batching against the static batcher and a naive per-request server.

Requests are streamed chat completions on smollm2-135m-instruct, spread evenly
over 8 LoRA adapters (random weights, r=8, all linear layers; made here) and
the base model. Prompts are the shipped evaluation examples (data/eval, their
real lengths); each asks for 8..128 new tokens (uniform, ``ignore_eos``). The
workload is drawn once from ``--seed``: every server gets the same requests.

1. Saturation: a closed loop of ``--batch`` clients for ``--saturation-s``
   seconds against the continuous and the static server (tokens/s, requests/s).
2. Open loop: Poisson arrivals at 30%, 70% and 120% of the continuous server's
   saturation request rate, for ``--duration-s`` seconds each, against the
   continuous server, the static server and the naive server (one peft model,
   one request at a time; it does not stream, so its first token comes with its
   last). Requests still running ``--drain-s`` after the last arrival are
   counted as unfinished.
3. Overload (continuous): rows + queue requests at one instant fill every
   place, then ``--burst-extra`` more arrive one at a time (``--overload-gap-s``
   apart) while the server is full, as at sustained overload: each must be
   refused at once. 120% for ``--duration-s`` seldom fills the queue, so this
   is where rejection is timed when that level refused nothing.
4. Burst (continuous): rows + queue + ``--burst-extra`` requests at one
   instant. The excess arrives last, behind the whole burst in the HTTP path
   (Serve's proxy, the gateway: a few ms per request on this machine), so its
   429s time that path's queue more than the refusal: reported beside, not as
   the target.

Figures per run: time to first token, inter-token latency and end-to-end
latency (p50/p99, completed requests), output tokens/s, rejected (429) with
the time the rejection took, failed (5xx, transport errors, streams ending in
an error) and unfinished; beside the client's inter-token gaps, the gaps
between tokens as the engine emitted them (the gateway's histogram, scraped
before and after each run): their difference is transport, not scheduling. Chart: TTFT and inter-token p99 against offered load.

Run under the offline wrapper (it starts Ray):
    ../shared/tools/offline .venv/bin/python benchmarks/serving_load.py

Last line: ``RESULT ttft_p99_ratio=<continuous/static TTFT p99 at 70%> sat_ratio=<continuous/static
saturation tokens/s> rejected_ms=<p99 time to a 429 at 120%, else at overload> rejected_wire_ms=<the same from the
request's headers leaving the client, without this client's own queue> burst_rejected_ms=<p99 time to a 429 in the
burst> lost=<accepted by the continuous server but not completed, all levels> itl_p99_vs_unloaded=<continuous
inter-token p99 at 70% / unloaded p50>``. Targets: ttft_p99_ratio <= 0.25, inter-token p99 at 70% <= 2x unloaded,
sat_ratio >= 1.0, rejected_ms < 100, lost = 0.
"""

# No `from __future__ import annotations`: the naive server's FastAPI handler (benchmarks/serving.py) needs real annotations.
import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).parent))

from common import OUT_DIR, make_random_adapters  # noqa: E402
from serving import naive_app  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "eval"
LEVELS = (0.3, 0.7, 1.2)
OVERLOAD_SETTLE_S = 1.5  # after the fill's burst, before the late arrivals: every place taken


@dataclass(frozen=True)
class Request:
    model: str
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    """One request as its client saw it."""

    status: int = 0  # HTTP status; 0: the connection failed
    ttft: Optional[float] = None
    gaps: list[float] = field(default_factory=list)  # between consecutive streamed chunks with text
    token_times: list[float] = field(default_factory=list)  # when each chunk with text arrived (perf_counter)
    e2e: float = 0.0
    on_wire: Optional[float] = None  # seconds from the call to the request's headers going out (the client's own queueing before)
    tokens: int = 0
    completed: bool = False
    error: str = ""


@dataclass
class Run:
    variant: str
    load: str  # "saturation", "unloaded" or the offered fraction of saturation
    rate: Optional[float]  # offered requests/s (open loop)
    elapsed: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)

    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.completed]

    window: Optional[tuple[float, float]] = None  # closed loop: tokens/s counts the tokens streamed in this window
    engine_gaps: dict[float, float] = field(default_factory=dict)  # the gateway's inter-token histogram over this run (le -> count)

    def tokens_per_s(self) -> float:
        if self.window is not None:  # steady state: from the first request's completion (clients now recycle) to the deadline
            starts = [o.token_times[-1] for o in self.done() if o.token_times]
            a, b = (min(starts) if starts else self.window[0]), self.window[1]
            if b - a > 1.0:
                return sum(1 for o in self.outcomes for t in o.token_times if a <= t <= b) / (b - a)
        return sum(o.tokens for o in self.done()) / self.elapsed if self.elapsed else 0.0

    def requests_per_s(self) -> float:
        return len(self.done()) / self.elapsed if self.elapsed else 0.0

    def rejected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 429]

    def failed(self) -> int:
        return sum(1 for o in self.outcomes if o.status != 429 and not o.completed and o.error != "unfinished")

    def unfinished(self) -> int:
        return sum(1 for o in self.outcomes if o.error == "unfinished")

    def lost(self) -> int:
        """Accepted (200) but ended without completing (an error mid-stream, a broken connection); unfinished not counted."""
        return sum(1 for o in self.outcomes if o.status == 200 and not o.completed and o.error != "unfinished")

    def figures(self) -> dict[str, Any]:
        done = self.done()
        gaps = [g for o in done for g in o.gaps]
        return {
            "variant": self.variant, "load": self.load, "rate": self.rate, "sent": len(self.outcomes), "completed": len(done),
            "rejected": len(self.rejected()), "failed": self.failed(), "unfinished": self.unfinished(), "lost": self.lost(),
            "tok_s": self.tokens_per_s(), "req_s": self.requests_per_s(),
            "ttft_p50": pct([o.ttft for o in done if o.ttft is not None], 0.5), "ttft_p99": pct([o.ttft for o in done if o.ttft is not None], 0.99),
            "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99),
            "e2e_p50": pct([o.e2e for o in done], 0.5), "e2e_p99": pct([o.e2e for o in done], 0.99),
            "rejected_ms_p99": pct([o.e2e for o in self.rejected()], 0.99) * 1000,
            "rejected_wire_ms_p99": pct([o.e2e - o.on_wire for o in self.rejected() if o.on_wire is not None], 0.99) * 1000,
            "engine_itl_p50": histogram_quantile(self.engine_gaps, 0.5), "engine_itl_p99": histogram_quantile(self.engine_gaps, 0.99),
        }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus's histogram_quantile: linear within the bucket that holds the q-th observation (cumulative counts by upper bound)."""
    if not buckets or not buckets.get(float("inf")):
        return float("nan")
    bounds = sorted(buckets)
    rank = q * buckets[float("inf")]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return lower


def engine_gaps(url: str) -> dict[float, float]:
    """The gateway's carve_inter_token_latency_seconds buckets now: gaps between a job's tokens as the engine emitted them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "carve_inter_token_latency_seconds":
            return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
    return {}


def measured(url: str, run_it: Any) -> Run:
    """``run_it()``'s run, with the engine's own inter-token histogram over it (the difference of two scrapes)."""
    before = engine_gaps(url)
    run = run_it()
    after = engine_gaps(url)
    run.engine_gaps = {le: count - before.get(le, 0.0) for le, count in after.items()}
    return run


def workload(models: list[str], count: int, seed: int) -> list[Request]:
    """``count`` requests: a shipped evaluation prompt, a served model and an output length, drawn from ``seed``."""
    prompts = []
    for path in sorted(DATA.glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            prompts.append(f"{row['instruction']}\n\n{row['input']}".strip())
    rng = random.Random(seed)
    return [Request(rng.choice(models), rng.choice(prompts), rng.randint(8, 128)) for _ in range(count)]


async def send(client: Any, request: Request, stream: bool) -> Outcome:
    """One chat completion; streamed: first-token time and the gaps between chunks."""
    body: dict[str, Any] = {
        "model": request.model, "messages": [{"role": "user", "content": request.prompt}], "max_tokens": request.max_tokens,
        "temperature": 0, "ignore_eos": True,
    }
    out = Outcome()
    started = time.perf_counter()

    async def trace(event: str, info: dict[str, Any]) -> None:  # httpcore's per-request trace: when the request leaves this client
        if event == "http11.send_request_headers.started":
            out.on_wire = time.perf_counter() - started

    try:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body, extensions={"trace": trace})
            out.status, out.e2e = response.status_code, time.perf_counter() - started
            if response.status_code == 200:
                out.ttft, out.tokens, out.completed = out.e2e, response.json()["usage"]["completion_tokens"], True
            else:
                out.error = response.text[:200]
            return out
        body.update(stream=True, stream_options={"include_usage": True})
        async with client.stream("POST", "/v1/chat/completions", json=body, extensions={"trace": trace}) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.error = (await response.aread()).decode()[:200]
                out.e2e = time.perf_counter() - started
                return out
            last: Optional[float] = None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.completed = out.tokens > 0 and not out.error
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"].get("message", "error")[:200]
                elif chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    out.token_times.append(now)
                    if last is None:
                        out.ttft = now - started
                    else:
                        out.gaps.append(now - last)
                    last = now
    except asyncio.CancelledError:
        out.error = "unfinished"
    except Exception as exc:  # noqa: BLE001  (transport errors count as failures)
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    out.e2e = time.perf_counter() - started
    return out


async def closed_loop(url: str, requests: list[Request], clients: int, seconds: float, stream: bool, label: str) -> Run:
    """``clients`` clients, each sending its next request when the previous one ends, for ``seconds``."""
    import httpx

    run = Run(label, "saturation", None)
    queue = iter(requests * 100)
    started = time.perf_counter()
    run.window = (started, started + seconds)

    async def client_loop(client: Any) -> None:
        while time.perf_counter() - started < seconds:
            run.outcomes.append(await send(client, next(queue), stream))

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=clients * 2)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    run.elapsed = time.perf_counter() - started
    return run


async def open_loop(url: str, requests: list[Request], rate: float, seconds: float, drain_s: float, stream: bool, label: str, load: str) -> Run:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``; what is still running ``drain_s`` later is unfinished."""
    import httpx

    run = Run(label, load, rate)
    rng = random.Random(7)
    tasks: list[asyncio.Task] = []
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=4096)) as client:
        at, i = 0.0, 0
        while True:
            at += rng.expovariate(rate)
            if at > seconds:
                break
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            tasks.append(asyncio.create_task(send(client, requests[i % len(requests)], stream)))
            i += 1
        done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        run.outcomes = list(await asyncio.gather(*tasks))
    finished = [started + o.e2e for o in run.outcomes if o.completed]
    run.elapsed = max(seconds, (max(finished) - started) if finished else seconds)
    return run


async def burst(url: str, requests: list[Request], count: int, label: str) -> Run:
    """``count`` streamed requests at the same instant: more than rows plus queue, so the excess must be refused at once."""
    import httpx

    run = Run(label, "burst", None)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=4096)) as client:
        run.outcomes = list(await asyncio.gather(*(send(client, r, True) for r in requests[:count])))
    run.elapsed = time.perf_counter() - started
    return run


async def overload(url: str, requests: list[Request], fill: int, extra: int, gap_s: float, label: str) -> tuple[Run, Run]:
    """``fill`` requests at once take every place (rows and queue), then ``extra`` arrive ``gap_s`` apart while they hold them.

    The fill asks for the longest outputs so that no place frees meanwhile.
    Two runs: the late arrivals (each should be a 429, timed) and the fill
    (each accepted and completed, or counted as lost).
    """
    import httpx

    run, filled = Run(label, "overload", None), Run(label, "overload fill", None)
    holders = [Request(r.model, r.prompt, 128) for r in requests[:fill]]
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=4096)) as client:
        held = [asyncio.ensure_future(send(client, r, True)) for r in holders]
        await asyncio.sleep(OVERLOAD_SETTLE_S)  # the fill is admitted (rows) or queued
        late = []
        for r in requests[fill : fill + extra]:
            late.append(asyncio.ensure_future(send(client, r, True)))
            await asyncio.sleep(gap_s)
        run.outcomes = list(await asyncio.gather(*late))
        filled.outcomes = list(await asyncio.gather(*held))
    run.elapsed = filled.elapsed = time.perf_counter() - started
    print(f"overload: {len(run.rejected())} of {extra} late arrivals refused, {len(filled.done())} of {fill} filling requests completed", flush=True)
    return run, filled


def table(runs: list[Run]) -> str:
    head = f"{'server':<11} {'load':>10} {'req/s':>6} {'sent':>5} {'done':>5} {'rej':>4} {'fail':>4} {'unfin':>5} {'tok/s':>7} " \
           f"{'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} {'eng p50':>8} {'eng p99':>8} {'e2e p50':>8} {'e2e p99':>8} {'rej ms':>7}"
    lines = [head]
    for run in runs:
        f = run.figures()
        rate = f"{f['rate']:.2f}" if f["rate"] else "-"
        lines.append(
            f"{f['variant']:<11} {f['load']:>10} {rate:>6} {f['sent']:>5} {f['completed']:>5} {f['rejected']:>4} {f['failed']:>4} {f['unfinished']:>5} "
            f"{f['tok_s']:>7.1f} {f['ttft_p50']:>9.2f} {f['ttft_p99']:>9.2f} {f['itl_p50'] * 1000:>8.0f} {f['itl_p99'] * 1000:>8.0f} "
            f"{f['engine_itl_p50'] * 1000:>8.0f} {f['engine_itl_p99'] * 1000:>8.0f} "
            f"{f['e2e_p50']:>8.2f} {f['e2e_p99']:>8.2f} {f['rejected_ms_p99']:>7.0f}"
        )
    return "\n".join(lines) + "\n(seconds; itl: between streamed chunks at the client, eng: between tokens as the engine emitted them (gateway histogram), in ms; rej ms: p99 time to a 429)"


def chart(runs: list[Run], unloaded_itl: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for variant, color in (("continuous", "#4C72B0"), ("static", "#DD8452"), ("naive", "#55A868")):
        points = sorted((float(r.load), r.figures()) for r in runs if r.variant == variant and r.rate)
        if not points:
            continue
        xs = [100 * x for x, _ in points]
        axes[0].plot(xs, [f["ttft_p99"] for _, f in points], "o-", color=color, label=f"{variant} p99")
        axes[0].plot(xs, [f["ttft_p50"] for _, f in points], "o--", color=color, alpha=0.6, label=f"{variant} p50")
        axes[1].plot(xs, [1000 * f["itl_p99"] for _, f in points], "o-", color=color, label=f"{variant} p99")
    axes[1].axhline(2000 * unloaded_itl, color="grey", linestyle=":", label="2x unloaded (target)")
    for ax, title, unit in ((axes[0], "Time to first token", "seconds"), (axes[1], "Inter-token latency", "ms")):
        ax.set_yscale("log")
        ax.set_xlabel("offered load, % of continuous saturation")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16, help="sequences decoded together (both batchers) and saturation clients")
    parser.add_argument("--max-waiting", type=int, default=16, help="continuous server's queue; more get 429")
    parser.add_argument("--max-step-tokens", type=int, default=128, help="continuous server's tokens per step (prefill chunk)")
    parser.add_argument("--max-step-ms", type=float, default=None, help="continuous server's inter-token target (prefill chunks cut to fit)")
    parser.add_argument("--burst-extra", type=int, default=8, help="a burst of rows + queue + this many requests at once measures rejection")
    parser.add_argument("--overload-gap-s", type=float, default=0.25, help="between the late arrivals at overload (the server full)")
    parser.add_argument("--saturation-s", type=float, default=60.0)
    parser.add_argument("--duration-s", type=float, default=60.0, help="arrivals per open-loop level")
    parser.add_argument("--drain-s", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--engine-nice", type=int, default=0, help="nice increment of the engines' decoding threads (the proxy and gateway run first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()

    from ray import serve

    from carve.adapters.registry import Registry
    from carve.common.paths import model_cache_dir
    from carve.engine.models import resolve_model
    from carve.platform.app import APP_NAME, build_app
    from carve.platform.launcher import make_config, start_local_server, stop_local_server

    resolved = resolve_model(args.model)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="carve-bench-") as tmp:
        os.environ["CARVE_MODEL_CACHE"] = str(model_cache_dir())
        os.environ["CARVE_HOME"] = tmp
        os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default niceness 15 measures the OS scheduler on a shared machine
        adapters = make_random_adapters(resolved.path, [f"dom{i}" for i in range(8)], Path(tmp) / "adapters")
        registry = Registry(Path(tmp) / "registry")
        for name, path in adapters.items():
            registry.add(path, name, base=resolved)
        models = [*adapters, "base"]
        requests = workload(models, 2000, args.seed)
        mean_tokens = sum(r.max_tokens for r in requests) / len(requests)
        settings = dict(
            max_adapters=8, engine_num_cpus=0, engine_threads=args.threads, max_batch_size=args.batch, max_waiting=args.max_waiting,
            max_tokens_cap=256, batch_wait_s=0.05, max_step_tokens=args.max_step_tokens, max_step_ms=args.max_step_ms, engine_nice=args.engine_nice,
        )
        handle = start_local_server(args.model, registry.root, 0, num_cpus=os.cpu_count() or 2, batching="continuous", **settings)
        url = handle.url
        try:
            saturation: dict[str, Run] = {}
            for variant in ("continuous", "static"):
                if variant == "static":
                    serve.delete(APP_NAME)
                    serve.run(build_app(make_config(args.model, registry.root, batching="static", **settings)), name=APP_NAME, route_prefix="/")
                asyncio.run(closed_loop(url, [Request(m, "Hello", 4) for m in models], len(models), 0.1, True, "warmup"))  # adapters loaded
                if variant == "continuous":
                    unloaded = measured(url, lambda: asyncio.run(closed_loop(url, requests[:8], 1, 20.0, True, variant)))
                    unloaded.load = "unloaded"
                    runs.append(unloaded)
                saturation[variant] = measured(url, lambda: asyncio.run(closed_loop(url, requests, args.batch, args.saturation_s, True, variant)))
                runs.append(saturation[variant])
                print(table(runs[-1:]), flush=True)
                sat_rate = saturation["continuous"].tokens_per_s() / mean_tokens  # requests/s the continuous server sustains
                for level in LEVELS:
                    runs.append(measured(url, lambda: asyncio.run(
                        open_loop(url, requests, level * sat_rate, args.duration_s, args.drain_s, True, variant, f"{level:.1f}")
                    )))
                    print(table(runs[-1:]).splitlines()[1], flush=True)
                if variant == "continuous":  # the excess is refused, how fast: one at a time when full, then all at once
                    places = args.batch + args.max_waiting
                    runs.extend(asyncio.run(overload(url, requests, places, args.burst_extra, args.overload_gap_s, variant)))
                    print("\n".join(table(runs[-2:]).splitlines()[1:3]), flush=True)
                    runs.append(asyncio.run(burst(url, requests[places + args.burst_extra :], places + args.burst_extra, variant)))
                    print(table(runs[-1:]).splitlines()[1], flush=True)
            serve.delete(APP_NAME)
            if not args.skip_naive:
                serve.run(naive_app(str(resolved.path), {n: str(p) for n, p in adapters.items()}, args.threads), name="naive", route_prefix="/naive")
                naive_url = url + "/naive"
                asyncio.run(closed_loop(naive_url, [Request(m, "Hello", 2) for m in adapters], 1, 0.1, False, "warmup"))
                for level in LEVELS:
                    runs.append(asyncio.run(open_loop(naive_url, requests, level * sat_rate, args.duration_s, args.drain_s, False, "naive", f"{level:.1f}")))
                    print(table(runs[-1:]).splitlines()[1], flush=True)
                serve.delete("naive")
        finally:
            stop_local_server()

    by = {(r.variant, r.load): r.figures() for r in runs}
    unloaded_itl = by[("continuous", "unloaded")]["itl_p50"]
    cb70, st70, cb120, cb_burst = by[("continuous", "0.7")], by[("static", "0.7")], by[("continuous", "1.2")], by[("continuous", "burst")]
    cb_over = by[("continuous", "overload")]
    rejecting = cb120 if cb120["rejected"] else cb_over
    rejected_ms, rejected_wire_ms = rejecting["rejected_ms_p99"], rejecting["rejected_wire_ms_p99"]
    sat_ratio = by[("continuous", "saturation")]["tok_s"] / by[("static", "saturation")]["tok_s"]
    lost = sum(r.lost() for r in runs if r.variant == "continuous")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "serving_load.json").write_text(json.dumps([r.figures() for r in runs], indent=1))
    picture = chart(runs, unloaded_itl, OUT_DIR / "serving_load.png")
    print()
    target = f", inter-token target {args.max_step_ms:.0f} ms" if args.max_step_ms else ""
    target += f", engine threads at nice +{args.engine_nice}" if args.engine_nice else ""
    print(f"{args.model}, {args.batch} sequences per batch, continuous queue {args.max_waiting}, step budget {args.max_step_tokens} tokens{target}, {args.threads} torch thread(s), "
          f"8 adapters + base, outputs 8-128 tokens, open-loop levels of {args.duration_s:.0f} s (drain {args.drain_s:.0f} s)")
    print(table(runs))
    print(f"unloaded inter-token p50 {1000 * unloaded_itl:.0f} ms; at 70%: continuous inter-token p99 {1000 * cb70['itl_p99']:.0f} ms "
          f"({cb70['itl_p99'] / unloaded_itl:.1f}x unloaded) at the client, {1000 * cb70['engine_itl_p99']:.0f} ms as the engine emitted them; "
          f"rejections at 120%: {cb120['rejected']}, at overload (the server full): {cb_over['rejected']} of {cb_over['sent']}, "
          f"p99 {rejected_ms:.0f} ms from the call, {rejected_wire_ms:.0f} ms from the request leaving the client (the rest is this client's own queue); "
          f"in the burst: {cb_burst['rejected']} of {cb_burst['sent']}, p99 {cb_burst['rejected_ms_p99']:.0f} ms; chart {picture}")
    print(f"RESULT ttft_p99_ratio={cb70['ttft_p99'] / st70['ttft_p99']:.3f} sat_ratio={sat_ratio:.2f} "
          f"rejected_ms={rejected_ms:.0f} rejected_wire_ms={rejected_wire_ms:.0f} burst_rejected_ms={cb_burst['rejected_ms_p99']:.0f} "
          f"lost={lost} itl_p99_vs_unloaded={cb70['itl_p99'] / unloaded_itl:.2f}")


if __name__ == "__main__":
    main()
