"""Which adapters an engine holds: at most ``capacity``, least recently used evicted first.

Loading an adapter takes the engine's lock, so the cache is used from the one
worker thread that runs batches. Adapters a batch is about to use are *pinned*
and never evicted by a load for the same batch.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Collection

from carve.platform.serving.targets import AdapterRef


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
    """An LRU of adapters over Engine.load_adapter / unload_adapter."""

    def __init__(self, engine: Any, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.engine = engine
        self.capacity = capacity
        self._held: OrderedDict[str, str] = OrderedDict()  # key -> engine adapter name, oldest first
        self._ids = count(1)
        self._keys_lock = threading.Lock()  # keys() is read by Serve's routing-stats call while a batch loads
        self.loads = 0
        self.evictions = 0

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
