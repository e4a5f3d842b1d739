"""The operator's view of the cluster: the last version of every watched object, kept by kopf's
watch events (an informer cache). Reconcilers read from here, never from the API server, so an
idle operator makes no requests at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tierwise.api.resources import AnyResource, CostBudget, InferenceTier, Namespace, Problem, parse_object
from tierwise.naming import TIER_LABEL

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects

# Kinds whose change can change some namespace's Policy.
POLICY_INPUTS = frozenset({"InferenceTier", "CostBudget", "CachePolicy", "Namespace"})
RESOURCE_KINDS = ("InferenceTier", "CostBudget", "CachePolicy")
# What a lean store keeps of an object's metadata: its identity, version and labels.
_SKELETON_META = ("name", "namespace", "uid", "resourceVersion", "generation", "labels")


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name", ""))


@dataclass
class Parsed:
    version: str
    result: AnyResource | Problem


@dataclass
class Store:
    objects: dict[str, dict[Key, Obj]] = field(default_factory=dict)
    # Bumped whenever a Policy input changes; lets derived results be cached per version.
    version: int = 0
    # Keep of a tierwise resource only its skeleton and its parsed form (parsed as it arrives):
    # for a reader that never needs the raw spec, the webhook, whose cache holds every object of
    # the cluster. A spec change bumps metadata.generation, so changes are still seen.
    lean: bool = False
    _parsed: dict[tuple[str, Key], Parsed] = field(default_factory=dict)

    def put(self, kind: str, obj: Obj) -> bool:
        """Record an object; True if it differs from what was known."""
        k = key_of(obj)
        bucket = self.objects.setdefault(kind, {})
        old = bucket.get(k)
        if old is not None and _rv(old) == _rv(obj) and _rv(obj):
            return False
        if self.lean and kind in RESOURCE_KINDS and _rv(obj):
            self.parsed(kind, obj)
            obj = _skeleton(obj)
        bucket[k] = obj
        if kind in POLICY_INPUTS and (old is None or _policy_view(old) != _policy_view(obj)):
            self.version += 1
        return True

    def remove(self, kind: str, obj: Obj) -> bool:
        k = key_of(obj)
        gone = self.objects.get(kind, {}).pop(k, None)
        if gone is not None and kind in POLICY_INPUTS:
            self.version += 1
        self._parsed.pop((kind, k), None)
        return gone is not None

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get(kind, {}).get((namespace, name))

    def all(self, kind: str) -> Iterator[Obj]:
        return iter(list(self.objects.get(kind, {}).values()))

    def parsed(self, kind: str, obj: Obj) -> AnyResource | Problem:
        """The typed resource (parsed once per resourceVersion), or why it does not parse."""
        k = key_of(obj)
        rv = _rv(obj)
        hit = self._parsed.get((kind, k))
        if hit is not None and hit.version == rv and rv:
            return hit.result
        doc: dict[str, Any] = {key: obj[key] for key in ("apiVersion", "kind", "metadata", "spec") if key in obj}
        result = parse_object(doc) or Problem(f"{kind} {k[0]}/{k[1]}", "", "not a tierwise resource")
        self._parsed[(kind, k)] = Parsed(rv, result)
        return result

    def resources(self) -> tuple[list[AnyResource], list[Problem]]:
        out: list[AnyResource] = []
        problems: list[Problem] = []
        for kind in RESOURCE_KINDS:
            for obj in self.all(kind):
                r = self.parsed(kind, obj)
                (problems if isinstance(r, Problem) else out).append(r)  # type: ignore[arg-type]
        return out, problems

    def tiers(self) -> list[InferenceTier]:
        """Every InferenceTier that parses."""
        return [t for o in self.all("InferenceTier") if isinstance(t := self.parsed("InferenceTier", o), InferenceTier)]

    def budgets(self) -> list[CostBudget]:
        """Every CostBudget that parses."""
        return [b for o in self.all("CostBudget") if isinstance(b := self.parsed("CostBudget", o), CostBudget)]

    def namespaces(self) -> list[Namespace]:
        return [namespace_of(o) for o in self.all("Namespace")]

    def tier(self, namespace: str, name: str) -> InferenceTier | None:
        obj = self.get("InferenceTier", namespace, name)
        if obj is None:
            return None
        r = self.parsed("InferenceTier", obj)
        return r if isinstance(r, InferenceTier) else None

    def owned(self, kind: str, namespace: str, tier: str) -> list[Obj]:
        return [
            o
            for (ns, _), o in self.objects.get(kind, {}).items()
            if ns == namespace and (o["metadata"].get("labels") or {}).get(TIER_LABEL) == tier
        ]


def namespace_of(obj: Obj) -> Namespace:
    """A Namespace object as the compiler sees it: its name and labels."""
    return Namespace(str(obj["metadata"]["name"]), dict(obj["metadata"].get("labels") or {}))


def _skeleton(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta[k] for k in _SKELETON_META if k in meta},
    }


def _rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _policy_view(obj: Obj) -> object:
    """The part of an object a Policy depends on (status writes must not trigger recompiles)."""
    meta = obj.get("metadata") or {}
    return (meta.get("labels"), meta.get("generation"), obj.get("spec"), meta.get("uid"))
