"""The Policy ConfigMap of every namespace that needs one: labelled for injection, or running an
ingress sidecar. Written only when it changes; a namespace keeps its last good Policy while an
object it uses is invalid; deleted when the namespace no longer needs it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Protocol

from tierwise.api.resources import object_ref
from tierwise.budgetrules import rule_of
from tierwise.compiler import compile_world
from tierwise.naming import (
    BUDGETS_KEY,
    INJECTION_LABEL,
    INJECTION_VALUES,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    POLICY_CONFIGMAP,
    POLICY_HASH_ANNOTATION,
    POLICY_KEY,
    STEERING_KEY,
)
from tierwise.policy import PolicyBudget, PolicyTier
from tierwise_operator import children
from tierwise_operator.budgetstatus import Reading
from tierwise_operator.controllers.base import Key, Obj, Queued
from tierwise_operator.kube import CONFIGMAP, ApiError
from tierwise_operator.manager import Derived, Manager
from tierwise_operator.steering import TierSteer

log = logging.getLogger("tierwise.operator")
NAME = "policies"
KEY: Key = (NAME, "", "")
SETTLE_SECONDS = 0.3
INPUTS = frozenset({"InferenceTier", "CostBudget", "CachePolicy", "Namespace"})


class SpendReadings(Protocol):
    def reading(self, key: str) -> Reading: ...


class Steering(Protocol):
    def steering(self, namespace: str, tier: str) -> TierSteer: ...


class PolicyController:
    name = NAME

    def __init__(self, m: Manager, spend: SpendReadings, sla: Steering) -> None:
        self.m = m
        self.spend = spend
        self.sla = sla

    def keys_for(self, kind: str, obj: Obj, deleted: bool) -> Iterable[Queued]:
        if kind in INPUTS:
            return ((KEY, SETTLE_SECONDS),)
        if kind == "ConfigMap":
            return ((KEY, 0.0),)
        return ()

    def all_keys(self) -> Iterable[Key]:
        return (KEY,)

    def moved(self, before: Derived, after: Derived) -> Iterable[Key]:
        return ()  # every input's event queues the key already

    def published(self, budgets: Iterable[PolicyBudget]) -> dict[str, Obj]:
        """What the sidecars are sent of each budget: its spend across every sidecar in the period
        last read, and the state and remaining amount that implies. Not in the Policy nor its hash:
        a spend change rebuilds nothing in a sidecar, and `tierwise compile` still matches."""
        out: dict[str, Obj] = {}
        for b in budgets:
            rule = rule_of(b)
            last = self.spend.reading(rule.key).last
            if last is None:
                continue
            committed = last.spent + last.held
            left = rule.remaining(committed)
            out[rule.key] = {
                "window": last.window_id,
                "spentMicros": last.spent.micros,
                "spentTokens": last.spent.tokens,
                "state": rule.state(committed).value,
                "remainingMicros": left.micros if rule.has_usd else None,
                "remainingTokens": left.tokens if rule.has_tokens else None,
            }
        return out

    def steered(self, tiers: Iterable[PolicyTier]) -> dict[str, Obj]:
        """The SLO steering of the namespace's tiers that are steered now, by the name the
        namespace knows them by: weights in force, and the share sent to another tier."""
        out: dict[str, Obj] = {}
        for t in tiers:
            steer = self.sla.steering(t.namespace, t.name)
            if not steer.steered(t.spec):
                continue
            d = steer.divert
            out[t.name] = {
                "weights": steer.weights(t.spec),
                "divert": None if d is None else {"to": d.to, "reason": d.reason, "percent": d.percent},
            }
        return out

    def targets(self) -> set[str]:
        """Namespaces that get a Policy ConfigMap: labelled for injection, or an ingress sidecar runs there."""
        store = self.m.store
        out = {
            str(o["metadata"]["name"])
            for o in store.all("Namespace")
            if (o["metadata"].get("labels") or {}).get(INJECTION_LABEL) in INJECTION_VALUES
            and not o["metadata"].get("deletionTimestamp")
        }
        for t in store.tiers():
            if any(d.sidecar for _, d in children.self_hosted(t.spec)):
                out.add(t.namespace)
        return out

    async def reconcile(self, namespace: str, name: str) -> None:
        d = self.m.derived()
        store, metrics = self.m.store, self.m.metrics
        targets = self.targets()
        for ns in sorted(targets):
            policy = compile_world(d.world, ns)
            if any(object_ref(s.kind, s.namespace, s.name) in d.problems for s in policy.sources):
                # Last known good stays in force: a broken object never half-deploys.
                metrics.policies_held.labels(ns).set(1)
                continue
            metrics.policies_held.labels(ns).set(0)
            data = {POLICY_KEY: json.dumps(policy.wire(), sort_keys=True, separators=(",", ":"))}
            spend = self.published(policy.budgets)
            if spend:
                data[BUDGETS_KEY] = json.dumps({"budgets": spend}, sort_keys=True, separators=(",", ":"))
            steering = self.steered(policy.tiers.values())
            if steering:
                data[STEERING_KEY] = json.dumps({"tiers": steering}, sort_keys=True, separators=(",", ":"))
            live = store.get("ConfigMap", ns, POLICY_CONFIGMAP)
            if live is not None and (live.get("data") or {}) == data:
                ann = (live["metadata"].get("annotations") or {}).get(POLICY_HASH_ANNOTATION)
                if ann == policy.hash:
                    continue
            cm = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": POLICY_CONFIGMAP,
                    "namespace": ns,
                    "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                    "annotations": {POLICY_HASH_ANNOTATION: policy.hash},
                },
                "data": data,
            }
            try:
                store.put("ConfigMap", await self.m.kube.apply(cm))
            except ApiError as e:
                if e.status == 404 or "being terminated" in e.message:
                    continue  # the namespace is going away
                raise
            if live is None or (live.get("data") or {}).get(POLICY_KEY) != data[POLICY_KEY]:
                log.info("namespace %s: Policy %s written", ns, policy.hash[:19])
        for live in store.all("ConfigMap"):
            meta = live["metadata"]
            ours = (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
            if meta["name"] == POLICY_CONFIGMAP and meta.get("namespace") not in targets and ours:
                await self.m.kube.delete(CONFIGMAP, meta["namespace"], POLICY_CONFIGMAP)
                store.remove("ConfigMap", live)
