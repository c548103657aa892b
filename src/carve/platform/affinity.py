"""Adapter locality across engine replicas: a Serve request router.

Each engine replica reports the adapters it holds (``record_routing_stats``,
polled every few seconds). The router also remembers where it sent each
adapter recently, so the next request for it follows at once, before the next
poll. A job goes to a replica holding its adapter; failing that, to one with a
free adapter slot; failing that, anywhere. Serve then picks the least loaded
replica within the first rank that has room, and falls through to the next
rank when that rank is full, so locality never costs availability.

This replaces Serve's model multiplexing, whose batching would split batches by
adapter (see the package docstring of ``engine_server``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, List, Optional, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

REMEMBER_S = 60.0  # how long a routing decision counts as "that replica holds this adapter"


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows about one replica."""

    id: Hashable
    held: frozenset[str]
    capacity: int


def rank_for_adapter(key: Optional[str], replicas: Sequence[ReplicaView], recent: dict[str, Hashable]) -> list[list[Hashable]]:
    """Replica ids in preference ranks for a job whose adapter is ``key`` (None: the base)."""
    if key is None:
        return [[r.id for r in replicas]]
    holders = [r.id for r in replicas if key in r.held or recent.get(key) == r.id]
    rest = [r for r in replicas if r.id not in holders]
    with_room = [r.id for r in rest if len(r.held) < r.capacity]
    full = [r.id for r in rest if len(r.held) >= r.capacity]
    return [rank for rank in (holders, with_room, full) if rank]


def adapter_key(pending_request: Optional[PendingRequest]) -> Optional[str]:
    """The adapter key of an engine call (its first argument is a Job; a mixture goes by its first adapter)."""
    if pending_request is None or not pending_request.args:
        return None
    job = pending_request.args[0]
    refs = job.refs() if hasattr(job, "refs") else [getattr(job, "adapter", None)]
    return getattr(refs[0], "key", None) if refs else None


class AdapterAffinityRouter(RequestRouter):
    """Routes each engine job to a replica that already holds its adapter."""

    def initialize_state(self, remember_s: float = REMEMBER_S, **_: Any) -> None:
        self._remember_s = remember_s
        self._recent: dict[str, tuple[ReplicaID, float]] = {}

    def _recent_ids(self) -> dict[str, Hashable]:
        horizon = time.monotonic() - self._remember_s
        return {k: rid for k, (rid, at) in self._recent.items() if at >= horizon}

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        recent = self._recent_ids()
        views = []
        for replica in candidate_replicas:
            stats = replica.routing_stats or {}
            # What the replica reported, plus what we sent it since (it is loading those now).
            held = set(stats.get("adapters", ())) | {k for k, rid in recent.items() if rid == replica.replica_id}
            views.append(ReplicaView(replica.replica_id, frozenset(held), int(stats.get("capacity", 1 << 30))))
        ranks = rank_for_adapter(adapter_key(pending_request), views, recent)
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every rank is offered: back off before retrying
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = adapter_key(pending_request)
        if key is not None:
            self._recent[key] = (replica_id, time.monotonic())
