"""What an engine holds: registered adapters and weight-space merges of them, each LRU with its own capacity.

Adapters: at most ``capacity``, least recently used evicted first. Loading
one takes the engine's lock, so the cache is used from the one worker thread
that runs batches; adapters a batch is about to use are *pinned* and never
evicted by a load for the same batch.

Merges: peft's ``add_weighted_adapter(..., combination_type="cat")`` builds
one adapter whose update is exactly sum_j w_j * dW_j (A matrices stacked, B
matrices scaled by w_j and stacked; rank = sum of ranks). It decodes as one
row, like a single adapter, but it mixes the experts' weights, not their
predictions, and takes a while to build (benchmarks/router.py), so merges are
kept per (adapter versions, weights), at most ``merge_capacity``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable, Collection, Optional, Sequence

from carve.artifact import AdapterRef

Weighted = Sequence[tuple[Optional[AdapterRef], float]]  # (adapter, or None for the base; weight)
MergeKey = tuple[tuple[str, float], ...]


class AdapterLoadError(RuntimeError):
    """An adapter's files failed to load; only requests for that adapter fail."""

    def __init__(self, ref: AdapterRef, reason: str):
        self.ref = ref
        super().__init__(f"adapter {ref.key} could not be loaded: {reason}")


class CacheFull(RuntimeError):
    """Every held adapter is pinned: the caller must split its batch."""


@dataclass
class Acquired:
    """The engine's name for an adapter, and what acquiring it changed."""

    engine_name: str
    loaded: bool = False
    evicted: list[str] = field(default_factory=list)


class AdapterCache:
    """LRUs of adapters and of their merges over Engine.load_adapter / unload_adapter."""

    def __init__(self, engine: Any, capacity: int, merge_capacity: int = 2):
        if capacity < 1 or merge_capacity < 1:
            raise ValueError(f"capacities must be at least 1, got {capacity} adapters and {merge_capacity} merges")
        self.engine = engine
        self.capacity = capacity
        self.merge_capacity = merge_capacity
        self._held: OrderedDict[str, str] = OrderedDict()  # key -> engine adapter name, oldest first
        self._merges: OrderedDict[MergeKey, str] = OrderedDict()  # merge key -> engine adapter name, oldest first
        self._ids = count(1)
        self._keys_lock = threading.Lock()  # keys() is read by Serve's routing-stats call while a batch loads
        self._merge_lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.merge_builds = 0
        self.merge_evictions = 0

    def keys(self) -> list[str]:
        """Held adapter keys, least recently used first."""
        with self._keys_lock:
            return list(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def acquire(self, ref: AdapterRef, pinned: Collection[str] = ()) -> Acquired:
        """Make ``ref`` loaded and most recently used, evicting unpinned adapters if full."""
        if ref.key in self._held:
            with self._keys_lock:
                self._held.move_to_end(ref.key)
            return Acquired(self._held[ref.key])
        evicted: list[str] = []
        while len(self._held) >= self.capacity:
            victim = next((k for k in self._held if k not in pinned and k != ref.key), None)
            if victim is None:
                raise CacheFull(f"all {self.capacity} held adapters are in use by this batch")
            with self._keys_lock:
                engine_name = self._held.pop(victim)
            self.engine.unload_adapter(engine_name)
            self.evictions += 1
            evicted.append(victim)
        name = self._engine_name(ref)
        try:
            self.engine.load_adapter(name, ref.path)
        except Exception as exc:  # any failure of these files fails this adapter only
            if name in self.engine.adapters:  # a half-done peft load: take it out again
                self.engine.unload_adapter(name)
            raise AdapterLoadError(ref, f"{type(exc).__name__}: {exc}") from exc
        with self._keys_lock:
            self._held[ref.key] = name
        self.loads += 1
        return Acquired(name, loaded=True, evicted=evicted)

    def _engine_name(self, ref: AdapterRef) -> str:
        # peft adapter names become module-dict keys: no dots; a counter keeps them unique.
        return f"{re.sub(r'[^A-Za-z0-9_]', '_', ref.name)}_v{ref.version}_{next(self._ids)}"

    def drop(self, key: str) -> bool:
        """Unload one held adapter now (an admission undone); False if it is not held."""
        with self._keys_lock:
            engine_name = self._held.pop(key, None)
        if engine_name is None:
            return False
        self.engine.unload_adapter(engine_name)
        self.evictions += 1
        return True

    def merge(self, weighted: Weighted, engine_name: Callable[[AdapterRef], str], pinned: Collection[str] = ()) -> str:
        """The engine name of the merge of ``weighted``'s adapters, built now if not held.

        The components must be loaded already; ``engine_name`` names them in the
        engine. Merges named in ``pinned`` (engine names still decoding) are
        not evicted: CacheFull when every held merge is. The build holds the
        engine's lock, so it never runs mid-decode.
        """
        pairs = [(ref, w) for ref, w in weighted if ref is not None]
        if len(pairs) < 2:
            raise ValueError("a weight-space merge needs at least two adapters")
        key = merge_key(pairs)
        with self._merge_lock:
            if key in self._merges:
                self._merges.move_to_end(key)
                return self._merges[key]
            name = "merged-" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            with self.engine.lock:
                while len(self._merges) >= self.merge_capacity:
                    victim = next((k for k, held in self._merges.items() if held not in pinned), None)
                    if victim is None:
                        raise CacheFull(f"all {self.merge_capacity} held weight-space merges are decoding")
                    self.engine.unload_adapter(self._merges.pop(victim))
                    self.merge_evictions += 1
                self.engine.model.add_weighted_adapter(
                    adapters=[engine_name(ref) for ref, _ in pairs], weights=[w for _, w in pairs],
                    adapter_name=name, combination_type="cat",
                )
            self.merge_builds += 1
            self._merges[key] = name
            return name


def merge_key(weighted: Weighted, digits: int = 6) -> MergeKey:
    """What identifies a merge: each adapter version with its weight (rounded), in a fixed order."""
    return tuple(sorted((ref.key, round(w, digits)) for ref, w in weighted if ref is not None))
