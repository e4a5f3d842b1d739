"""SLO-driven steering, decided per tier and cycle from what Prometheus showed (pure).

A backend that misses its tier's SLO (its own latency, from the start of the try that answered,
or its error rate) while another backend of the tier does not is drained step by step: its
routing weight halved, then 0. It comes back step by step once it is well inside the SLO (below
80% of every target) for several cycles; a drained backend, which has no traffic to judge, is
tried again at half weight once a whole SLO window has passed (its slow requests have left the
window by then), like a breaker's half-open state. The band between 80%
and 100% holds whatever was decided, and every step needs consecutive cycles: no flapping.

When the whole tier misses as its callers see it, a share of its traffic goes to the tier its
`promotion.borrowFrom` names, growing up to `maxBorrowPercent`, or, without a promotion, down its
fallback chain (to `fallback.tier`); the share shrinks again, the same way, once the tier is
well inside its SLO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tierwise.api.tier import SLO, InferenceTierSpec
from tierwise_operator.slomath import LATENCY_TARGETS

LEVELS = 2  # full weight; 1: half; 0: drained
MISS_CYCLES = 2
GOOD_CYCLES = 3
RECOVER_MARGIN = 0.8
MISS, GOOD, HOLD, NONE = "miss", "good", "hold", "none"
PROMOTED, FALLBACK = "promoted", "fallback"


@dataclass(frozen=True)
class Verdict:
    kind: str  # MISS, GOOD, HOLD or NONE (nothing to judge on)
    why: str = ""  # what missed, with the numbers


def judge(slo: SLO, values: Mapping[str, float | None]) -> Verdict:
    missed: list[str] = []
    judged = close = False
    checks = [(key, getattr(slo, attr)) for key, attr in LATENCY_TARGETS]
    checks.append(("errorRatePercent", slo.max_error_rate_percent))
    for key, target in checks:
        value = values.get(key)
        if target is None or value is None:
            continue
        judged = True
        if value > target:
            missed.append(f"{key} {value:g} > {target:g}")
        elif value > RECOVER_MARGIN * target:
            close = True
    if missed:
        return Verdict(MISS, "; ".join(missed))
    if not judged:
        return Verdict(NONE)
    return Verdict(HOLD if close else GOOD)


@dataclass(frozen=True)
class BackendSteer:
    level: int = LEVELS
    bad: int = 0
    good: int = 0
    since: float = 0.0  # when it was drained (monotonic seconds)
    why: str = ""  # why it is drained, while it is


@dataclass(frozen=True)
class Divert:
    to: str
    reason: str  # PROMOTED or FALLBACK
    percent: int


@dataclass(frozen=True)
class TierSteer:
    backends: Mapping[str, BackendSteer] = field(default_factory=dict)
    divert: Divert | None = None
    bad: int = 0
    good: int = 0
    why: str = ""

    def weights(self, spec: InferenceTierSpec) -> dict[str, int]:
        """The routing weight of each backend now: the declared one scaled by its level."""
        out = {}
        for b in spec.backends:
            level = self.backends.get(b.name, BackendSteer()).level
            out[b.name] = (
                b.weight
                if level == LEVELS
                else (max(1, math.ceil(b.weight * level / LEVELS)) if level and b.weight else 0)
            )
        return out

    def steered(self, spec: InferenceTierSpec) -> bool:
        return self.divert is not None or self.weights(spec) != {b.name: b.weight for b in spec.backends}


DECLARED = TierSteer()  # nothing steered: the declared weights, no diversion


def divert_target(spec: InferenceTierSpec) -> tuple[str, str, int] | None:
    """Where a missing tier's traffic may go: (tier, reason, most percent)."""
    if spec.promotion is not None:
        return spec.promotion.borrow_from, PROMOTED, spec.promotion.max_borrow_percent
    if spec.fallback is not None:
        return spec.fallback.tier, FALLBACK, 50
    return None


def _backend(prev: BackendSteer, v: Verdict, may_drain: bool, now: float, window: float) -> BackendSteer:
    if v.kind == MISS:
        s = replace(prev, bad=prev.bad + 1, good=0)
        if s.bad >= MISS_CYCLES and s.level > 0 and may_drain:
            return replace(s, level=s.level - 1, bad=0, why=v.why, since=now)
        return s
    if v.kind == GOOD:
        s = replace(prev, good=prev.good + 1, bad=0)
        if s.good >= GOOD_CYCLES and s.level < LEVELS:
            level = s.level + 1
            return replace(s, level=level, good=0, why="" if level == LEVELS else s.why)
        return s
    if v.kind == HOLD:
        return replace(prev, bad=0, good=0)
    if prev.level == 0 and now - prev.since >= window:
        return replace(prev, level=1, bad=0, good=0)  # drained a whole window: try it at half weight
    return prev


def step(
    spec: InferenceTierSpec,
    prev: TierSteer,
    tier: Mapping[str, float | None],
    backends: Mapping[str, Mapping[str, float | None]],
    now: float,
) -> TierSteer:
    """The steering after one more cycle's numbers (the tier's, and each backend's), at `now`
    (monotonic seconds)."""
    verdicts = {b.name: judge(spec.slo, backends.get(b.name, {})) for b in spec.backends}
    weighted = [b.name for b in spec.backends if b.weight > 0]
    new: dict[str, BackendSteer] = {}
    for b in spec.backends:
        # Draining moves the load to the others: only worth it while another one is doing well.
        healthy_other = any(verdicts[o].kind in (GOOD, HOLD) for o in weighted if o != b.name)
        prior = prev.backends.get(b.name, BackendSteer())
        new[b.name] = _backend(prior, verdicts[b.name], healthy_other, now, spec.slo.window_seconds)
    if weighted and all(new[n].level == 0 for n in weighted):
        new = {n: (prev.backends.get(n, BackendSteer()) if s.level == 0 else s) for n, s in new.items()}
    result = replace(prev, backends=new)
    target = divert_target(spec)
    if target is None:
        return replace(result, divert=None, bad=0, good=0, why="")
    to, reason, most = target
    stride = max(1, math.ceil(most / 2))
    share = prev.divert.percent if prev.divert is not None else 0
    v = judge(spec.slo, tier)
    if v.kind == MISS:
        bad, good = prev.bad + 1, 0
        if bad >= MISS_CYCLES and share < most:
            share, bad = min(most, share + stride), 0
        why = v.why
    elif v.kind == GOOD:
        bad, good = 0, prev.good + 1
        if good >= GOOD_CYCLES and share > 0:
            share, good = max(0, share - stride), 0
        why = prev.why if share else ""
    else:
        bad, good, why = 0, 0, prev.why if share else ""
    divert = Divert(to, reason, share) if share else None
    return replace(result, divert=divert, bad=bad, good=good, why=why)


def describe(spec: InferenceTierSpec, before: TierSteer, after: TierSteer) -> list[tuple[str, str]]:
    """What changed, for an Event each: (Warning when steering away, Normal when coming back, message)."""
    out = []
    w0, w1 = before.weights(spec), after.weights(spec)
    for b in spec.backends:
        if w0[b.name] != w1[b.name]:
            s = after.backends.get(b.name, BackendSteer())
            if w1[b.name] < w0[b.name]:
                out.append(("Warning", f"backend {b.name} drained: weight {w0[b.name]} -> {w1[b.name]} ({s.why})"))
            else:
                out.append(("Normal", f"backend {b.name} restored: weight {w0[b.name]} -> {w1[b.name]}"))
    d0, d1 = before.divert, after.divert
    p0, p1 = (d0.percent if d0 else 0), (d1.percent if d1 else 0)
    if p0 != p1:
        d = d1 or d0
        assert d is not None
        verb = "promoting" if d.reason == PROMOTED else "sending down the fallback chain"
        if p1 > p0:
            out.append(("Warning", f"{verb} {p1}% of the tier's traffic to {d.to} ({after.why})"))
        else:
            out.append(("Normal", f"{verb} {p1}% of the tier's traffic to {d.to} (was {p0}%): within its SLO again"))
    return out
