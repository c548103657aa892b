"""carve.router: turn a request into a list of (adapter reference, weight) branches.

- :class:`Router`: explicit names and tags, ``auto`` (content against each
  adapter's profile, base below a confidence threshold), mixtures given in the
  request or chosen as the auto top-k (carve.router.decision);
- profiles built from each adapter's seeds and synthetic instructions
  (carve.router.profiles);
- counting decisions for /metrics (carve.router.metrics).

In a server: keep one ``Router(registry, RouterConfig(), base_fingerprint=...)``
(profiles stay in memory; ``warm()`` builds them ahead), call
``router.route(body.model, routing_text(prompt or messages), body.carve)`` off
the event loop, answer a RoutingError with ``exc.status`` / ``exc.param`` /
``exc.code``, report ``decision.uses()`` in the response and count
``RoutingMetrics.count(decision)``. ``decision.weighted()`` is the
[(AdapterRef or None, weight)] list an engine decodes: in output space as one
branch per adapter (carve.engine.batching), in weight space as one merged
adapter (carve.engine.adapter_cache).
"""

from carve.router.decision import (
    AutoOptions,
    CarveOptions,
    RoutedBranch,
    Router,
    RouterConfig,
    RoutingDecision,
    RoutingError,
    routing_text,
)

__all__ = [
    "AutoOptions",
    "CarveOptions",
    "RoutedBranch",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "RoutingError",
    "routing_text",
]
