"""What the validating webhook judges a change against: the cluster's tierwise objects and
namespaces, with the problems they have now.

From the informer's cache while it is current, so an admission costs the API server nothing;
from a LIST otherwise, and to confirm a refusal or a warning, because the cache trails the API
server by the moment a watch event takes: the tier a new one falls back to may have been applied
a millisecond earlier, by the same `kubectl apply`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from tierwise.api.resources import AnyResource, Namespace, Problem
from tierwise_operator.informer import Informer
from tierwise_operator.kube import BUDGET, CACHE, NAMESPACE, TIER, Kube
from tierwise_operator.store import Store
from tierwise_operator.validation import parsed_objects, standing

KINDS = (TIER, BUDGET, CACHE, NAMESPACE)


@dataclass(frozen=True)
class Snapshot:
    resources: list[AnyResource]
    namespaces: list[Namespace]
    problems: frozenset[Problem]
    cached: bool


class ClusterView:
    def __init__(
        self, kube: Kube, platform: str, watch: bool = True, on_read: Callable[[str], None] = lambda _: None
    ) -> None:
        self.kube = kube
        self.platform = platform
        self.store = Store()
        self.informer = Informer(kube, self.store, KINDS) if watch else None
        self.on_read = on_read
        self._snapshot: tuple[int, Snapshot] | None = None

    async def run(self) -> None:
        """Keep the cache (nothing to do without one)."""
        if self.informer is not None:
            await self.informer.run()

    def cached(self) -> Snapshot | None:
        """The cache's view, its standing problems computed once per change; None while not current."""
        if self.informer is None or not self.informer.current:
            return None
        version = self.store.version
        if self._snapshot is None or self._snapshot[0] != version:
            resources, _ = self.store.resources()
            namespaces = self.store.namespaces()
            problems = standing(resources, namespaces, self.platform)
            self._snapshot = (version, Snapshot(resources, namespaces, problems, cached=True))
        self.on_read("cache")
        return self._snapshot[1]

    async def fresh(self) -> Snapshot:
        """The API server's view, now."""
        tiers, budgets, caches, spaces = await asyncio.gather(*(self.kube.list(k) for k in KINDS))
        resources = parsed_objects([*tiers, *budgets, *caches])
        namespaces = [Namespace(str(n["metadata"]["name"]), dict(n["metadata"].get("labels") or {})) for n in spaces]
        self.on_read("list")
        return Snapshot(resources, namespaces, standing(resources, namespaces, self.platform), cached=False)
