"""Prometheus metrics of one gateway: requests, tokens, latency, scheduling, adapter loads and evictions.

The gateway sees every request and every engine event (engine replicas report
with a job's events the adapter loads and evictions it caused, its time in the
queue, when each token was emitted, and on the final event the replica's load:
running and waiting sequences, step time and tokens per step), so one registry
in the gateway covers the whole application.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:
    from carve.engine.batching import EngineLoad

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8)


class ServerMetrics:
    """The counters and histograms, in a registry of their own (not the process-global one)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("carve_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("carve_tokens", "Tokens processed, by kind (prompt or completion).", ["kind"], registry=self.registry)
        self.latency = Histogram(
            "carve_request_latency_seconds", "Time from request to last token.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.first_token = Histogram(
            "carve_time_to_first_token_seconds", "Time from request to its first token.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queue_time = Histogram(
            "carve_queue_seconds", "Time a job waited for admission into a running batch.", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.inter_token = Histogram(
            "carve_inter_token_latency_seconds", "Time between consecutive tokens of one job.", buckets=TOKEN_GAP_BUCKETS, registry=self.registry
        )
        self.adapter_requests = Counter("carve_adapter_requests", "Engine jobs by adapter (base: the base model).", ["adapter"], registry=self.registry)
        self.replica_jobs = Counter(
            "carve_replica_jobs", "Engine jobs finished, by the replica that ran them and adapter (where the traffic went).", ["replica", "adapter"], registry=self.registry
        )
        self.running = Gauge("carve_engine_running_sequences", "Sequences decoding, per engine replica (as of its last finished job).", ["replica"], registry=self.registry)
        self.waiting = Gauge("carve_engine_waiting_requests", "Requests queued, per engine replica (as of its last finished job).", ["replica"], registry=self.registry)
        self.step_time = Gauge("carve_engine_step_seconds", "Mean time of one decoding step, per engine replica.", ["replica"], registry=self.registry)
        self.step_tokens = Gauge("carve_engine_step_tokens", "Mean tokens run per decoding step (decoded plus prefill), per engine replica.", ["replica"], registry=self.registry)
        self.steps = Gauge("carve_engine_decode_steps", "Decoding steps run since the replica started.", ["replica"], registry=self.registry)
        self.cached_prompt_tokens = Gauge(
            "carve_engine_prefix_cache_tokens", "Prompt tokens copied from the prefix cache instead of run, since the replica started.", ["replica"], registry=self.registry
        )
        self.draft_tokens = Gauge(
            "carve_engine_draft_tokens", "Draft tokens of speculative decoding checked (drafted) and kept (accepted), since the replica started.",
            ["replica", "kind"], registry=self.registry,
        )
        self.cancelled = Gauge("carve_engine_cancelled_jobs", "Jobs cancelled because their callers went away, since the replica started.", ["replica"], registry=self.registry)
        self.replica_retries = Counter(
            "carve_replica_retries", "Engine calls sent again because the replica holding them went away, by Ray's error.", ["error"], registry=self.registry
        )
        self.adapter_loads = Counter("carve_adapter_loads", "Adapters loaded into an engine replica.", ["adapter"], registry=self.registry)
        self.adapter_evictions = Counter("carve_adapter_evictions", "Adapters evicted from an engine replica (LRU).", ["adapter"], registry=self.registry)
        self.adapter_load_failures = Counter(
            "carve_adapter_load_failures", "Adapters whose files failed to load.", ["adapter"], registry=self.registry
        )

    def replica_retry(self, exc: BaseException) -> None:
        self.replica_retries.labels(type(exc).__name__).inc()

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)

    def cache_events(self, loaded: Iterable[str], evicted: Iterable[str]) -> None:
        for key in loaded:
            self.adapter_loads.labels(key).inc()
        for key in evicted:
            self.adapter_evictions.labels(key).inc()

    def adapter_request(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.adapter_requests.labels(key).inc()

    def scheduling(self, queue_s: Optional[float], token_times: Sequence[float], load: "Optional[EngineLoad]", adapters: Iterable[str] = ()) -> None:
        """What a finished job's events tell about scheduling: its queue time, gaps between its tokens, which replica ran it and its load."""
        if queue_s is not None:
            self.queue_time.observe(queue_s)
        for before, after in zip(token_times, token_times[1:]):
            self.inter_token.observe(max(0.0, after - before))
        if load is not None:
            for key in adapters:
                self.replica_jobs.labels(load.replica, key).inc()
            self.running.labels(load.replica).set(load.running)
            self.waiting.labels(load.replica).set(load.waiting)
            self.step_time.labels(load.replica).set(load.step_s)
            self.step_tokens.labels(load.replica).set(load.step_tokens)
            self.steps.labels(load.replica).set(load.steps)
            self.cancelled.labels(load.replica).set(load.cancelled)
            self.cached_prompt_tokens.labels(load.replica).set(load.cached_prompt_tokens)
            self.draft_tokens.labels(load.replica, "drafted").set(load.drafted_tokens)
            self.draft_tokens.labels(load.replica, "accepted").set(load.accepted_draft_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
