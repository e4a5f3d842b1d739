"""The two shapes a controller takes.

A reconciler owns a key space (its name is the first part of every key): it says which keys a
watch event maps to, and reconciles one key at a time, level-triggered and idempotent, from the
manager's cache. An observer reads something outside the API server (Prometheus, Redis) on an
interval and returns the keys whose observation changed; it writes nothing itself. Exactly one
reconciler writes each object's status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tierwise_operator.manager import Derived

Key = tuple[str, str, str]  # (controller, namespace, name)
Queued = tuple[Key, float]  # a key and how long to let events settle before working it
Obj = dict[str, Any]


@runtime_checkable
class Reconciler(Protocol):
    name: str

    def keys_for(self, kind: str, obj: Obj, deleted: bool) -> Iterable[Queued]:
        """The keys a watch event on `obj` (already in the cache) affects."""
        ...

    def all_keys(self) -> Iterable[Key]:
        """Every key, for the first pass after start."""
        ...

    def moved(self, before: Derived, after: Derived) -> Iterable[Key]:
        """The keys whose verdict the newly compiled world may have changed."""
        ...

    async def reconcile(self, namespace: str, name: str) -> None: ...


@runtime_checkable
class Observer(Protocol):
    name: str
    interval: float
    wake: asyncio.Event  # set to run the next pass now rather than after `interval`

    async def observe(self) -> Iterable[Key]:
        """One pass: the keys whose observation changed since the last."""
        ...
