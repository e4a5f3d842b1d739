"""A list-then-watch cache of a few kinds (an informer) for a process that reads the cluster on
every request: the validating webhook judges each tierwise object against all the others, and
listing them all on every admission costs the API server a LIST of every tier, budget, cache
policy and namespace each time (hundreds of milliseconds at a thousand tiers).

Each kind is listed once, then watched from the list's resourceVersion; an expired watch (410)
or any error relists. While a kind has not been listed, or its watch broke and has not been
relisted, the cache is not `current` and readers must go to the API server themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tierwise_operator.kube import ApiError, Kind, Kube
from tierwise_operator.store import Store, key_of

log = logging.getLogger("tierwise.informer")
Obj = dict[str, Any]


class _RelistError(Exception):
    """The watch cannot go on from where it is (its resourceVersion expired)."""


def slim(obj: Obj) -> Obj:
    """What the cache keeps of an object: managedFields and status are most of a stored custom
    resource, and nothing a Policy depends on."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}


class Informer:
    def __init__(
        self, kube: Kube, store: Store, kinds: Sequence[Kind], max_backoff: float = 30.0, watch_seconds: int = 240
    ) -> None:
        self.kube = kube
        self.store = store
        self.kinds = list(kinds)
        self.max_backoff = max_backoff
        self.watch_seconds = watch_seconds
        self._current = {k.kind: False for k in self.kinds}

    @property
    def current(self) -> bool:
        """Every kind listed, and every watch unbroken since."""
        return all(self._current.values())

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(k) for k in self.kinds))

    def _replace(self, kind: Kind, items: list[Obj]) -> None:
        listed = {key_of(o) for o in items}
        for obj in list(self.store.all(kind.kind)):
            if key_of(obj) not in listed:
                self.store.remove(kind.kind, obj)
        for obj in items:
            self.store.put(kind.kind, slim(obj))

    async def _follow(self, kind: Kind) -> None:
        backoff = 0.5
        while True:
            try:
                items, version = await self.kube.list_versioned(kind)
                self._replace(kind, items)
                self._current[kind.kind] = True
                backoff = 0.5
                while True:  # the server ends each watch after a while: resume where it ended
                    started = asyncio.get_running_loop().time()
                    version = await self._watch(kind, version)
                    if asyncio.get_running_loop().time() - started < 1:
                        await asyncio.sleep(1)  # a watch ended at once: do not spin on it
            except asyncio.CancelledError:
                raise
            except _RelistError as e:
                self._current[kind.kind] = False
                log.info("relisting %s: %s", kind.plural, e)
            except Exception as e:  # any failure: stale until relisted, never dead
                self._current[kind.kind] = False
                log.warning("%s cache broken (%s: %s); relisting in %.1f s", kind.plural, type(e).__name__, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _watch(self, kind: Kind, version: str) -> str:
        async with contextlib.aclosing(self.kube.watch(kind, version, self.watch_seconds)) as events:
            return await self._apply(kind, version, events)

    async def _apply(self, kind: Kind, version: str, events: AsyncIterator[Obj]) -> str:
        """Apply watch events to the store; the last resourceVersion seen."""
        async for event in events:
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                if obj.get("code") == 410:
                    raise _RelistError(obj.get("message", "resourceVersion too old"))
                raise ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if event.get("type") == "DELETED":
                self.store.remove(kind.kind, obj)
            elif event.get("type") in ("ADDED", "MODIFIED"):
                obj.setdefault("apiVersion", kind.api_version)
                obj.setdefault("kind", kind.kind)
                self.store.put(kind.kind, slim(obj))
        return version
