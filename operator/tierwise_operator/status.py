"""A tier's status from what was observed (pure). Conditions keep their lastTransitionTime while
their status holds, and the whole status compares equal when nothing changed, so an idle operator
writes nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tierwise.api.tier import SLO, InferenceTierSpec
from tierwise_operator.slomath import LATENCY_TARGETS
from tierwise_operator.steering import DECLARED, TierSteer

Obj = dict[str, Any]


@dataclass(frozen=True)
class BackendState:
    name: str
    self_hosted: bool
    desired: int = 0  # replicas asked for
    replicas: int = 0
    ready: int = 0

    @property
    def serving(self) -> bool:
        return not self.self_hosted or self.ready > 0


@dataclass(frozen=True)
class SLOObservation:
    """Service level seen in Prometheus over the SLO window; all None when there was no traffic."""

    values: Mapping[str, float | None] = field(default_factory=dict)
    error: str | None = None  # Prometheus unreachable or not configured
    backends: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)  # each backend's own


@dataclass(frozen=True)
class Observed:
    generation: int
    backends: Sequence[BackendState]
    problems: Sequence[str] = ()  # why the tier cannot be realised (spec or cross-object errors)
    slo: SLOObservation = SLOObservation(error="no Prometheus configured (--prometheus-url)")
    scaling: Mapping[str, str] = field(default_factory=dict)  # backend -> why it has its replicas
    scaling_blind: bool = False  # the autoscaler is holding for want of metrics
    steer: TierSteer = DECLARED  # SLO steering in force


def condition(type_: str, ok: bool | None, reason: str, message: str, generation: int) -> Obj:
    return {
        "type": type_,
        "status": "Unknown" if ok is None else ("True" if ok else "False"),
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def merge_conditions(old: Sequence[Obj], new: Sequence[Obj], now: str) -> list[Obj]:
    """New conditions, keeping each one's lastTransitionTime unless its status changed."""
    before = {c.get("type"): c for c in old}
    out = []
    for c in new:
        prev = before.get(c["type"])
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"] else None
        out.append({**c, "lastTransitionTime": since or now})
    return out


VALID_MESSAGE = "compiles with the objects it refers to"


def validity_status(old: Obj, problems: Sequence[str], generation: int, now: str) -> Obj:
    """A budget's or cache policy's status as far as the operator judges it: whether it compiles
    with the rest of the cluster's objects. Other fields (spend, entries) are left as they are."""
    ready = condition(
        "Ready", not problems, "InvalidSpec" if problems else "Valid", "; ".join(problems) or VALID_MESSAGE, generation
    )
    others = [c for c in old.get("conditions", []) if c.get("type") != "Ready"]
    return {
        **old,
        "observedGeneration": generation,
        "conditions": [*others, *merge_conditions(old.get("conditions", []), [ready], now)],
    }


AT_RISK = 0.9


def slo_verdict(slo: SLO, seen: Mapping[str, float | None]) -> tuple[str, list[str]]:
    """(Met | AtRisk | Missed | Unknown, what missed or is close)."""
    missed: list[str] = []
    close: list[str] = []
    judged = False
    for key, attr in LATENCY_TARGETS:
        target, value = getattr(slo, attr), seen.get(key)
        if target is None or value is None:
            continue
        judged = True
        if value > target:
            missed.append(f"{key} {value:g} > {target}")
        elif value > AT_RISK * target:
            close.append(f"{key} {value:g} near {target}")
    err = seen.get("errorRatePercent")
    if err is not None:
        judged = True
        if err > slo.max_error_rate_percent:
            missed.append(f"errorRatePercent {err:g} > {slo.max_error_rate_percent:g}")
    avail = seen.get("availabilityPercent")
    if avail is not None:
        judged = True
        if avail < slo.availability_percent:
            missed.append(f"availabilityPercent {avail:g} < {slo.availability_percent:g}")
    if missed:
        return "Missed", missed
    if close:
        return "AtRisk", close
    return ("Met", []) if judged else ("Unknown", [])


def routing_weights(
    spec: InferenceTierSpec, backends: Sequence[BackendState], steer: TierSteer = DECLARED
) -> dict[str, int]:
    """Weights in force: the steered ones (declared, or lowered while a backend misses the SLO),
    zero for a backend that cannot serve right now."""
    serving = {b.name for b in backends if b.serving}
    steered = steer.weights(spec)
    return {b.name: (steered[b.name] if b.name in serving else 0) for b in spec.backends}


def steering_notes(spec: InferenceTierSpec, steer: TierSteer) -> list[str]:
    notes = []
    for b in spec.backends:
        s = steer.backends.get(b.name)
        if s is not None and s.why and steer.weights(spec)[b.name] < b.weight:
            notes.append(f"backend {b.name} at weight {steer.weights(spec)[b.name]} of {b.weight}: {s.why}")
    if steer.divert is not None:
        d = steer.divert
        notes.append(f"{d.percent}% of requests sent to {d.to} ({d.reason}): {steer.why}")
    return notes


def tier_status(spec: InferenceTierSpec, seen: Observed, old: Obj, now: str) -> Obj:
    backends = seen.backends
    ready = [b for b in backends if b.serving]
    hosted = [b for b in backends if b.self_hosted]
    g = seen.generation
    if seen.problems:
        ready_c = condition("Ready", False, "InvalidSpec", "; ".join(seen.problems), g)
    elif not ready:
        waiting = ", ".join(f"{b.name} {b.ready}/{b.desired}" for b in hosted)
        ready_c = condition(
            "Ready", False, "BackendsNotReady", f"no backend can serve yet (ready/desired: {waiting})", g
        )
    else:
        ready_c = condition("Ready", True, "BackendsReady", f"{len(ready)}/{len(backends)} backends can serve", g)
    if seen.slo.error is not None:
        state, notes = "Unknown", [seen.slo.error]
        slo_c = condition("SLOMet", None, "MetricsUnavailable", seen.slo.error, g)
    else:
        state, notes = slo_verdict(spec.slo, seen.slo.values)
        if state == "Unknown":
            slo_c = condition("SLOMet", None, "NoTraffic", f"no requests in the last {spec.slo.window_seconds}s", g)
        elif state == "Missed":
            slo_c = condition("SLOMet", False, "SLOMissed", "; ".join(notes), g)
        else:
            msg = "; ".join(notes) if notes else f"within the SLO over {spec.slo.window_seconds}s"
            slo_c = condition("SLOMet", True, "AtRisk" if state == "AtRisk" else "SLOMet", msg, g)
    lagging = [b for b in hosted if b.ready < b.desired]
    if seen.problems:
        deg_c = condition("Degraded", True, "InvalidSpec", "the tier's objects are not being updated", g)
    elif lagging:
        detail = ", ".join(f"{b.name} {b.ready}/{b.desired} ready" for b in lagging)
        deg_c = condition("Degraded", True, "ReplicasNotReady", detail, g)
    elif state == "Missed":
        deg_c = condition("Degraded", True, "SLOMissed", "; ".join([*notes, *steering_notes(spec, seen.steer)]), g)
    elif steering_notes(spec, seen.steer):
        deg_c = condition("Degraded", True, "Steered", "; ".join(steering_notes(spec, seen.steer)), g)
    elif seen.scaling_blind:
        deg_c = condition("Degraded", True, "MetricsUnavailable", "autoscaler holding replicas: " + "; ".join(
            f"{k}: {v}" for k, v in sorted(seen.scaling.items())), g)  # fmt: skip
    else:
        deg_c = condition("Degraded", False, "AsDeclared", "serving as declared", g)
    observed = {k: v for k, v in seen.slo.values.items() if v is not None}
    status: Obj = {
        "observedGeneration": g,
        "readyBackends": len(ready),
        "totalBackends": len(backends),
        "replicas": sum(b.replicas for b in hosted),
        "readyReplicas": sum(b.ready for b in hosted),
        "sloState": state,
        "routingWeights": routing_weights(spec, backends, seen.steer),
        "conditions": merge_conditions(old.get("conditions", []), [ready_c, slo_c, deg_c], now),
    }
    if observed:
        status["observed"] = observed
    per_backend = {b: {k: v for k, v in vals.items() if v is not None} for b, vals in seen.slo.backends.items()}
    per_backend = {b: vals for b, vals in per_backend.items() if vals}
    if per_backend:
        status["observedBackends"] = per_backend
    d = seen.steer.divert
    if d is not None:
        status["diversion"] = {"to": d.to, "reason": d.reason.capitalize(), "percent": d.percent, "why": seen.steer.why}
    return status


STARTING = frozenset({"BackendsNotReady", "ReplicasNotReady"})


def _bad(c: Obj) -> bool:
    return c.get("status") == ("True" if c.get("type") == "Degraded" else "False")


def transitions(old: Sequence[Obj], new: Sequence[Obj]) -> list[tuple[str, str, str]]:
    """Events worth posting: (type, reason, message) when a condition turns bad, changes why it is
    bad, or a tier becomes Ready. Steady states post nothing."""
    before = {c.get("type"): c for c in old}
    out = []
    for c in new:
        prev = before.get(c["type"])
        if prev is None and c["reason"] in STARTING:
            continue  # a new tier's pods not being ready yet is how every tier starts
        if _bad(c) and (prev is None or not _bad(prev) or prev.get("reason") != c["reason"]):
            out.append(("Warning", c["reason"], c["message"]))
        elif c["type"] == "Ready" and c["status"] == "True" and (prev is None or prev.get("status") != "True"):
            out.append(("Normal", "Ready", c["message"]))
    return out


def status_changed(old: Obj, new: Obj) -> bool:
    """Would writing `new` change anything? (a field absent from `new` is one to remove)"""
    return any(old.get(k) != new.get(k) for k in set(new) | set(old))


def merge_patch(old: Obj, new: Obj) -> Obj:
    """An RFC 7386 merge patch turning `old` into `new` (keys that are gone become null)."""
    patch: Obj = {}
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, dict) and isinstance(o, dict):
            sub = merge_patch(o, v)
            if sub:
                patch[k] = sub
        elif o != v:
            patch[k] = v
    for k in old:
        if k not in new:
            patch[k] = None
    return patch
