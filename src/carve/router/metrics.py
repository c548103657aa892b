"""Routing decisions for /metrics: one counter by mode (explicit, auto, mixture, base), target and space."""

from __future__ import annotations

from typing import Any

from carve.router.decision import RoutingDecision


class RoutingMetrics:
    """``carve_routing_decisions_total{mode, target, space}``, registered in the server's own registry."""

    def __init__(self, registry: Any):
        from prometheus_client import Counter

        self.decisions = Counter(
            "carve_routing_decisions", "Routing decisions by mode, target (adapter names, or base) and mixture space.",
            ["mode", "target", "space"], registry=registry,
        )

    def count(self, decision: RoutingDecision) -> None:
        space = decision.space if decision.is_mixture else "single"
        self.decisions.labels(decision.mode, decision.target_label(), space).inc()
