"""The cache's shared state: each CachePolicy's layers (by the policy's name, so they outlive a
Policy reload), and one single-flight table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tierwise_sidecar.cache.flight import Flights
from tierwise_sidecar.cache.key import Covered
from tierwise_sidecar.cache.memory import MemoryLayer
from tierwise_sidecar.cache.similar import SimilarIndex
from tierwise_sidecar.state import Key, SharedState


class Caches:
    def __init__(self, state: SharedState) -> None:
        self.memory: dict[str, MemoryLayer] = {}
        # Near-duplicate indexes, per policy that matches them.
        self.indexes: dict[str, SimilarIndex] = {}
        self.flights = Flights()

    def configure(self, policies: Sequence[Covered]) -> None:
        """The layers of the Policy going into force (on the event loop, at the swap): new bounds
        apply at once, and the layers of policies that are gone are dropped."""
        keep: dict[str, MemoryLayer] = {}
        self.indexes = {
            c.name: self.indexes.get(c.name) or SimilarIndex(c.policy.spec.layers.memory.max_entries)
            for c in policies
            if c.policy.spec.similarity.enabled
        }
        for c in policies:
            spec = c.policy.spec.layers.memory
            if not spec.enabled:
                continue
            m = self.memory.get(c.name)
            if m is None:
                m = MemoryLayer(spec.max_entries, spec.max_bytes)
            elif (m.max_entries, m.max_bytes) != (spec.max_entries, spec.max_bytes):
                m.resize(spec.max_entries, spec.max_bytes)
            keep[c.name] = m
        self.memory = keep

    def sizes(self) -> Iterator[tuple[tuple[str, str], str, int, int, int]]:
        for name, m in self.memory.items():
            namespace, _, policy = name.partition("/")
            yield (namespace, policy), m.name, len(m), m.bytes, m.evictions


CACHES: Key[Caches] = Key("caches", Caches)
