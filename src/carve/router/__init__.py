"""carve.router: turn a request into a list of (adapter, weight) branches."""
