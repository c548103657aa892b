"""Prometheus metrics of one gateway: requests, tokens, latency, adapter loads and evictions.

The gateway sees every request and every engine event (engine replicas report
the adapter loads and evictions a job caused with its events), so one registry
in the gateway covers the whole application.
"""

from __future__ import annotations

from typing import Iterable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The counters and histograms, in a registry of their own (not the process-global one)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("carve_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("carve_tokens", "Tokens processed, by kind (prompt or completion).", ["kind"], registry=self.registry)
        self.latency = Histogram(
            "carve_request_latency_seconds", "Time from request to last token.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.first_token = Histogram(
            "carve_time_to_first_token_seconds", "Time from request to its first token.", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.adapter_loads = Counter("carve_adapter_loads", "Adapters loaded into an engine replica.", ["adapter"], registry=self.registry)
        self.adapter_evictions = Counter("carve_adapter_evictions", "Adapters evicted from an engine replica (LRU).", ["adapter"], registry=self.registry)
        self.adapter_load_failures = Counter(
            "carve_adapter_load_failures", "Adapters whose files failed to load.", ["adapter"], registry=self.registry
        )

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

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
