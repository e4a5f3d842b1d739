"""Budgets: the spend observer reads every budget's spend of its current period (from Redis when
the sidecars count there, else from Prometheus); the budget controller, the one writer of a
CostBudget's status, turns it into spent, reserved, remaining, projection, state and the Events
of threshold crossings. The policy controller publishes the same spend to the sidecars beside the
Policy (budgets.json), where a sidecar without Redis counts it as the others' spend.

When the source cannot be read the last reading stays in force, in status and in what the
sidecars are sent (nothing is loosened), and the SpendObserved condition says since when it is
stale and why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime

from tierwise.api.resources import CostBudget, Problem
from tierwise.budgetrules import ZERO, BudgetRule, rule_of
from tierwise.periods import Window, window
from tierwise.policy import PolicyBudget
from tierwise_operator.budgetstatus import Reading, Spend, budget_status
from tierwise_operator.controllers.base import Key, Obj, Queued
from tierwise_operator.controllers.policies import KEY as POLICIES
from tierwise_operator.kube import BUDGET
from tierwise_operator.manager import Derived, Manager, now_iso
from tierwise_operator.spend import PrometheusSpend, RedisSpend, SpendSource, SpendUnavailableError

log = logging.getLogger("tierwise.operator")
NAME = "budget"
SETTLE_SECONDS = 0.3


def rule_and_window(b: CostBudget, now: datetime) -> tuple[BudgetRule, Window] | None:
    """The budget as the sidecars judge it, and its current period; None if its zone is unknown."""
    try:
        w = window(b.spec.period, b.spec.time_zone, now.timestamp())
    except ValueError:
        return None  # the compiler reports the zone
    return rule_of(PolicyBudget(name=b.name, namespace=b.namespace, spec=b.spec)), w


class SpendObserver:
    name = "spend"

    def __init__(self, m: Manager) -> None:
        self.m = m
        self.interval = m.config.spend_interval
        self.wake = asyncio.Event()
        self.source: SpendSource | None = None
        if m.config.redis_url:
            self.source = RedisSpend(m.config.redis_url)
        elif (prom := m.prometheus(self.name)) is not None:
            self.source = PrometheusSpend(prom)
        self.readings: dict[str, Reading] = {}

    def reading(self, key: str) -> Reading:
        if self.source is None:
            return Reading(unconfigured=True)
        return self.readings.get(key, Reading())

    async def observe(self) -> Iterable[Key]:
        if self.source is None:
            return ()
        now = self.m.clock()
        items: list[tuple[CostBudget, Window]] = []
        for b in self.m.store.budgets():
            rw = rule_and_window(b, now)
            if rw is not None:
                items.append((b, rw[1]))
        keys = [(f"{b.namespace}/{b.name}", w) for b, w in items]
        changed: list[Key] = []
        try:
            got = await self.source.read(keys, now.timestamp())
        except SpendUnavailableError as e:
            for b, _ in items:
                key = f"{b.namespace}/{b.name}"
                old = self.readings.get(key, Reading())
                new = Reading(old.last, str(e), old.failed_since or now.timestamp())
                if new.error != old.error:
                    log.warning("budget %s: spend not read (%s); the last reading stays in force", key, e)
                    self.readings[key] = new
                    changed.append((NAME, b.namespace, b.name))
            return changed
        spend_moved = False
        for (b, w), (key, _) in zip(items, keys, strict=True):
            spent, held = got.get(key, (ZERO, ZERO))  # absent: nothing spent yet this period
            old = self.readings.get(key, Reading())
            last = old.last
            if last is not None and last.window_id == w.id and last.spent == spent and last.held == held:
                fresh = Spend(w.id, spent, held, self.source.name, last.at)  # unchanged: keep its time
            else:
                fresh = Spend(w.id, spent, held, self.source.name, now.timestamp())
                spend_moved = spend_moved or last is None or last.spent != spent or last.window_id != w.id
            new = Reading(fresh)
            if new != old:
                self.readings[key] = new
                changed.append((NAME, b.namespace, b.name))
        if spend_moved:
            changed.append(POLICIES)
        return changed


class BudgetController:
    name = NAME

    def __init__(self, m: Manager, spend: SpendObserver) -> None:
        self.m = m
        self.spend = spend

    def keys_for(self, kind: str, obj: Obj, deleted: bool) -> Iterable[Queued]:
        if kind != "CostBudget":
            return ()
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name", ""))
        if deleted:
            self.spend.readings.pop(f"{ns}/{name}", None)
        else:
            self.spend.wake.set()  # a new or changed budget: read its spend now
        return (((NAME, ns, name), SETTLE_SECONDS),)

    def all_keys(self) -> Iterable[Key]:
        for obj in self.m.store.all("CostBudget"):
            yield NAME, obj["metadata"]["namespace"], obj["metadata"]["name"]

    def moved(self, before: Derived, after: Derived) -> Iterable[Key]:
        for b in after.world.budgets:
            if before.problems.get(b.ref) != after.problems.get(b.ref):
                yield NAME, b.namespace, b.name

    async def reconcile(self, namespace: str, name: str) -> None:
        m = self.m
        obj = m.store.get("CostBudget", namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        parsed = m.store.parsed("CostBudget", obj)
        generation = int(obj["metadata"].get("generation") or 0)
        old = obj.get("status") or {}
        now = m.clock()
        if isinstance(parsed, Problem) or not isinstance(parsed, CostBudget):
            problems = [str(parsed)]
            rw = None
        else:
            problems = m.derived().problems.get(parsed.ref, [])
            rw = rule_and_window(parsed, now)
        reading = self.spend.reading(rw[0].key) if rw is not None else Reading()
        status, events = budget_status(rw, reading, old=old, problems=problems, generation=generation, now=now_iso())
        await m.patch_status(BUDGET, obj, status)
        for type_, reason, message in events:
            log.info("budget %s/%s: %s", namespace, name, message)
            await m.event(obj, type_, reason, message)
