"""Ready for the kinds whose status says only whether they compile with the others: with the
validating webhook down (failurePolicy Ignore) a contradicting object is admitted, and this is
where it shows."""

from __future__ import annotations

from collections.abc import Iterable

from tierwise.api.resources import Problem
from tierwise_operator.controllers.base import Key, Obj, Queued
from tierwise_operator.kube import Kind
from tierwise_operator.manager import Derived, Manager, now_iso
from tierwise_operator.status import validity_status

SETTLE_SECONDS = 0.3


class ValidityController:
    def __init__(self, m: Manager, name: str, kind: Kind) -> None:
        self.m = m
        self.name = name
        self.kind = kind

    def keys_for(self, kind: str, obj: Obj, deleted: bool) -> Iterable[Queued]:
        if kind != self.kind.kind:
            return ()
        meta = obj.get("metadata") or {}
        return (((self.name, str(meta.get("namespace") or ""), str(meta.get("name", ""))), SETTLE_SECONDS),)

    def all_keys(self) -> Iterable[Key]:
        for obj in self.m.store.all(self.kind.kind):
            yield self.name, obj["metadata"]["namespace"], obj["metadata"]["name"]

    def moved(self, before: Derived, after: Derived) -> Iterable[Key]:
        for r in [*after.world.budgets, *after.world.caches]:
            if r.kind_name == self.kind.kind and before.problems.get(r.ref) != after.problems.get(r.ref):
                yield self.name, r.namespace, r.name

    async def reconcile(self, namespace: str, name: str) -> None:
        obj = self.m.store.get(self.kind.kind, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        parsed = self.m.store.parsed(self.kind.kind, obj)
        problems = [str(parsed)] if isinstance(parsed, Problem) else self.m.derived().problems.get(parsed.ref, [])
        generation = int(obj["metadata"].get("generation") or 0)
        await self.m.patch_status(
            self.kind, obj, validity_status(obj.get("status") or {}, problems, generation, now_iso())
        )
