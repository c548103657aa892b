"""carve.router: turn a request into a list of (adapter, weight) branches.

- :class:`Router` / :func:`route`: explicit names and tags, ``auto`` (content
  against each adapter's profile, base below a confidence threshold), mixtures
  given in the request or chosen as the auto top-k (carve.router.decision);
- profiles built from each adapter's seeds and synthetic instructions
  (carve.router.profiles);
- decoding a decision in output space (engine ``mixture`` rule) or weight space
  (cached peft ``cat`` merges) (carve.router.mixture);
- counting decisions for /metrics (carve.router.metrics).
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
