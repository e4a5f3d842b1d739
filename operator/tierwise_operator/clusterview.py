"""What the validating webhook judges a change against: the cluster's tierwise objects and
namespaces, with the problems they have now.

A watch (the informer) keeps them all, so an admission need not LIST the whole cluster. But the
cache trails the API server by the moment a watch event takes, and within one `kubectl apply` the
object admitted a millisecond earlier (the tier a new one names, an edit that closes a cycle) may
not be in it yet. So what can make a problem with the incoming object is read fresh on every
admission (small LISTs) and laid over the cache: the tiers of its namespace and of the platform
namespace (a cycle runs within a namespace, or into the platform's tiers, which only see each
other; a namespace's default tiers are its own and the platform's), and for a budget the budgets
of its namespace (budgets contradict only within a namespace). Objects in the platform namespace
can reach any namespace: they, and any admission while the cache is not current, are judged on a
fresh LIST of everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tierwise.api.resources import AnyResource, Namespace, Problem
from tierwise_operator.informer import Informer
from tierwise_operator.kube import BUDGET, CACHE, NAMESPACE, TIER, Kind, Kube, Obj
from tierwise_operator.store import Store, key_of, namespace_of
from tierwise_operator.validation import parsed_objects, standing

RESOURCES = (TIER, BUDGET, CACHE)
KINDS = (*RESOURCES, NAMESPACE)


@dataclass(frozen=True)
class Snapshot:
    resources: list[AnyResource]
    namespaces: list[Namespace]
    problems: frozenset[Problem]
    # "cache" (the namespaces read fresh matched it), "merged" (they did not: laid over it) or
    # "list" (everything read fresh).
    source: str


def _versions(objs: Iterable[tuple[str, Obj]]) -> set[tuple[str, str, str, str]]:
    return {(kind, *key_of(o), str(o["metadata"].get("resourceVersion") or "")) for kind, o in objs}


class ClusterView:
    def __init__(self, kube: Kube, platform: str, on_read: Callable[[str], None] = lambda _: None) -> None:
        self.kube = kube
        self.platform = platform
        self.store = Store(lean=True)
        self.informer = Informer(kube, self.store, KINDS)
        self.on_read = on_read
        self._snapshot: tuple[int, Snapshot] | None = None

    async def run(self) -> None:
        """Keep the cache."""
        await self.informer.run()

    def _cached(self) -> Snapshot | None:
        """The cache's view, its standing problems computed once per change; None while not current."""
        if not self.informer.current:
            return None
        version = self.store.version
        if self._snapshot is None or self._snapshot[0] != version:
            resources, _ = self.store.resources()
            namespaces = self.store.namespaces()
            problems = standing(resources, namespaces, self.platform)
            self._snapshot = (version, Snapshot(resources, namespaces, problems, "cache"))
        return self._snapshot[1]

    async def fresh(self) -> Snapshot:
        """The API server's view of everything, now."""
        lists = await asyncio.gather(*(self.kube.list(k) for k in KINDS))
        resources = parsed_objects(o for objs in lists[: len(RESOURCES)] for o in objs)
        namespaces = [namespace_of(n) for n in lists[-1]]
        self.on_read("list")
        return Snapshot(resources, namespaces, standing(resources, namespaces, self.platform), "list")

    async def for_object(self, kind: str, namespace: str) -> Snapshot:
        """What to judge an object of `kind` in `namespace` on (see the module's docstring)."""
        if not self.informer.current or namespace == self.platform:
            return await self.fresh()
        scope: list[tuple[Kind, str]] = [(TIER, namespace), (TIER, self.platform)]
        if kind == BUDGET.kind:
            scope.append((BUDGET, namespace))
        lists = await asyncio.gather(*(self.kube.list(k, ns) for k, ns in scope))
        listed = [(k.kind, o) for (k, _), objs in zip(scope, lists, strict=True) for o in objs]
        # The cache's view and what it holds of the scope are read at one moment, after the LISTs
        # (no await between): the comparison below is about the view that will be used.
        base = self._cached()
        if base is None:
            return await self.fresh()
        fresh = {(k.kind, ns) for k, ns in scope}
        held = [(k.kind, o) for k, ns in scope for o in self.store.all(k.kind) if key_of(o)[0] == ns]
        if _versions(listed) == _versions(held):
            self.on_read("cache")
            return base
        resources = [r for r in base.resources if (r.kind_name, r.namespace) not in fresh] + parsed_objects(
            o for _, o in listed
        )
        self.on_read("merged")
        return Snapshot(resources, base.namespaces, standing(resources, base.namespaces, self.platform), "merged")
