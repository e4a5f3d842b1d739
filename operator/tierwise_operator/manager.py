"""The manager, in the manner of controller-runtime's: one cache, one work queue, one client, and
the helpers every controller shares (the compiled world, status patches, events). Controllers plug
in (tierwise_operator/controllers/); the manager knows none of them by name.

Keys are (controller, namespace, name): the manager routes a watch event to every reconciler that
maps it to keys, works each key on the reconciler it names, and runs each observer on its interval,
queueing the keys whose observation changed. A failure in one key never blocks another; transient
API errors come back with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from tierwise.api.resources import InferenceTier
from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE, _World, build_world, check
from tierwise.naming import DEFAULT_SIDECAR_IMAGE
from tierwise_operator.controllers.base import Key, Observer, Reconciler
from tierwise_operator.kube import ApiError, Kind, Kube, Obj
from tierwise_operator.metrics import OperatorMetrics
from tierwise_operator.promql import Scope
from tierwise_operator.signals import Prometheus
from tierwise_operator.status import merge_patch, status_changed, transitions
from tierwise_operator.store import Store
from tierwise_operator.workqueue import RetryLaterError, WorkQueue

log = logging.getLogger("tierwise.operator")


@dataclass
class Config:
    platform_namespace: str = DEFAULT_PLATFORM_NAMESPACE
    prometheus_url: str | None = None
    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    autoscale_interval: float = 15.0
    slo_interval: float = 30.0
    steering_hold: float = 300.0
    redis_url: str | None = None
    spend_interval: float = 30.0
    workers: int = 4


@dataclass
class Derived:
    """What the whole world implies, computed once per store version."""

    version: int
    world: _World
    problems: dict[str, list[str]]  # object ref -> messages
    callers: dict[tuple[str, str], tuple[str, ...]]  # (tier ns, tier) -> namespaces resolving to it


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Manager:
    def __init__(self, kube: Kube, store: Store, config: Config, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.store = store
        self.config = config
        self.metrics = metrics
        self.queue: WorkQueue[Key] = WorkQueue(self._reconcile, workers=config.workers, on_error=self._failed)
        metrics.queue_depth.set_function(lambda: len(self.queue))
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.keda_installed = False
        self.reconcilers: dict[str, Reconciler] = {}
        self.observers: list[Observer] = []
        self._derived: Derived | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def register(self, controller: Reconciler | Observer) -> None:
        if isinstance(controller, Reconciler):
            if controller.name in self.reconcilers:
                raise ValueError(f"two reconcilers named {controller.name}")
            self.reconcilers[controller.name] = controller
        if isinstance(controller, Observer):
            self.observers.append(controller)

    # ------------------------------------------------------------ events and the queue

    def observe(self, kind: str, obj: Obj, deleted: bool) -> None:
        """A watch event: update the cache, queue the keys it maps to."""
        changed = self.store.remove(kind, obj) if deleted else self.store.put(kind, obj)
        if not changed:
            return
        for r in self.reconcilers.values():
            for key, delay in r.keys_for(kind, obj, deleted):
                if delay:
                    self.queue.add_after(key, delay)
                else:
                    self.queue.add(key)

    def enqueue(self, keys: Iterable[Key]) -> None:
        for k in keys:
            self.queue.add(k)

    def requeue_all(self) -> None:
        for r in self.reconcilers.values():
            self.enqueue(r.all_keys())

    def start(self) -> None:
        self.queue.start()
        self._tasks = [asyncio.create_task(self._run(o), name=o.name) for o in self.observers]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.stop()

    async def _run(self, observer: Observer) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(observer.wake.wait(), observer.interval)
            observer.wake.clear()
            try:
                with self.metrics.observe_seconds.labels(observer.name).time():
                    keys = await observer.observe()
                self.enqueue(keys)
            except Exception:
                log.exception("%s pass failed; trying again in %.0fs", observer.name, observer.interval)

    def _failed(self, key: Key, e: BaseException) -> None:
        self.metrics.errors.labels(key[0], type(e).__name__).inc()
        if isinstance(e, (ApiError, RetryLaterError)):
            log.warning("%s: %s (retrying with backoff)", "/".join(k for k in key if k), e)
        else:
            log.error("%s failed", "/".join(k for k in key if k), exc_info=e)

    async def _reconcile(self, key: Key) -> None:
        with self.metrics.reconcile_seconds.labels(key[0]).time():
            try:
                await self.reconcilers[key[0]].reconcile(key[1], key[2])
            except ApiError as e:
                if e.transient:
                    raise RetryLaterError(str(e)) from e
                raise

    # ------------------------------------------------------------ the world

    def derived(self) -> Derived:
        d = self._derived
        if d is not None and d.version == self.store.version:
            return d
        resources, parse_problems = self.store.resources()
        world = build_world(resources, self.store.namespaces(), self.config.platform_namespace)
        problems: dict[str, list[str]] = {}
        for p in [*parse_problems, *check(world, resources)]:
            problems.setdefault(p.obj, []).append(f"{p.field}: {p.reason}" if p.field else p.reason)
        callers: dict[tuple[str, str], list[str]] = {}
        for ns in world.namespaces():  # every namespace with objects or labels known
            for name, t in world.visible_tiers(ns).items():
                callers.setdefault((t.namespace, name), []).append(ns)
        d = Derived(self.store.version, world, problems, {k: tuple(v) for k, v in callers.items()})
        before = self._derived
        self._derived = d
        if before is not None:
            # A verdict can change without its object changing (the tier it falls back to just
            # arrived or went away): each reconciler names the keys the new world moved.
            for r in self.reconcilers.values():
                self.enqueue(r.moved(before, d))
        return d

    def prometheus(self, observer: str) -> Prometheus | None:
        """A Prometheus client for an observer, its queries counted under its name."""
        url = self.config.prometheus_url
        if not url:
            return None
        counter = self.metrics.prometheus_queries.labels(observer)
        return Prometheus(url, on_query=counter.inc)

    def scope(self, tier: InferenceTier, backend: str | None) -> Scope:
        """Where a tier's (or one backend's) traffic shows in Prometheus: the namespaces calling it."""
        return Scope(tier.name, backend, self.derived().callers.get((tier.namespace, tier.name), ()))

    # ------------------------------------------------------------ writes every controller needs

    async def patch_status(self, kind: Kind, obj: Obj, new: Obj) -> None:
        """Write `new` as the object's status when it differs, and post events for what turned."""
        old = obj.get("status") or {}
        if not status_changed(old, new):
            return
        meta = obj["metadata"]
        try:
            updated = await self.kube.patch_status(kind, meta["namespace"], meta["name"], merge_patch(old, new))
        except ApiError as e:
            if e.status == 404:
                return
            raise
        self.store.put(kind.kind, updated)
        for type_, reason, message in transitions(old.get("conditions", []), new.get("conditions", [])):
            await self.event(obj, type_, reason, message)

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.event(obj, type_, reason, message)
        except ApiError as e:  # an event is a courtesy: never fail a reconcile over one
            log.warning("could not post event %s on %s: %s", reason, obj["metadata"].get("name"), e)
