"""carve.router: turn a request into a list of (adapter, weight) branches.

- :class:`Router` / :func:`route`: explicit names and tags, ``auto`` (content
  against each adapter's profile, base below a confidence threshold), mixtures
  given in the request or chosen as the auto top-k (carve.router.decision);
- profiles built from each adapter's seeds and synthetic instructions
  (carve.router.profiles);
- decoding a decision in output space (engine ``mixture`` rule) or weight space
  (cached peft ``cat`` merges) (carve.router.mixture);
- counting decisions for /metrics (carve.router.metrics).

In a server: keep one ``Router(registry, RouterConfig(), base_fingerprint=...)``
(profiles stay in memory; ``warm()`` builds them ahead), call
``router.route(body.model, routing_text(prompt or messages), body.carve)`` off
the event loop, answer a RoutingError with ``exc.status`` / ``exc.param`` /
``exc.code``, report ``decision.uses()`` in the response and count
``RoutingMetrics.count(decision)``. ``decision.weighted()`` is the
[(adapter, weight)] list that ``mixture.engine_request`` (output space) or
``mixture.MergeCache.acquire`` (weight space) turns into engine work.
"""

from carve.router.decision import (
    AutoOptions,
    CarveOptions,
    RoutedBranch,
    Router,
    RouterConfig,
    RoutingDecision,
    RoutingError,
    route,
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
    "route",
    "routing_text",
]
