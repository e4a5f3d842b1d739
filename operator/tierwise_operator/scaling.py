"""The built-in SLO-aware autoscaler's decisions (pure: observations and the clock come in as values).

Like the HPA's algorithm, with what an LLM tier needs on top: desired = ceil(load / target) for
the load signals (in-flight requests, tokens/s, queue depth; a 10% tolerance band avoids flapping),
current x (observed p95 / SLO) / target for SLO headroom; bounded by the backend's replica range
and, inside a schedule's window, by that window's floor; a scale-down takes the highest
recommendation of the stabilisation window, a scale-up the lowest of its own window. Missing data
never scales down: the decision holds and says why.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, time
from zoneinfo import ZoneInfo

from tierwise.api.tier import Autoscaling, ReplicaRange, ScalingSchedule, ScalingSignal

TOLERANCE = 0.1


@dataclass(frozen=True)
class Observation:
    """What Prometheus said about one backend; None where it could not say."""

    load: float | None
    requests: float | None  # requests to the tier over the idle window
    error: str | None = None  # why there is no data (Prometheus unreachable, query failed)


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    metrics_available: bool


def _in_window(s: ScalingSchedule, now: datetime) -> bool:
    local = now.astimezone(ZoneInfo(s.time_zone))
    start, end = time.fromisoformat(s.start), time.fromisoformat(s.end)
    clock = local.time()
    if start < end:
        inside, day = start <= clock < end, local
    else:  # overnight: the window belongs to the day it started on
        inside = clock >= start or clock < end
        day = local if clock >= start else local.fromordinal(local.toordinal() - 1)
    return inside and (not s.days or day.strftime("%a") in {str(d) for d in s.days})


def active_schedule(a: Autoscaling, now: datetime) -> ScalingSchedule | None:
    """The first schedule whose window contains `now` (declaration order breaks ties)."""
    return next((s for s in a.schedules if _in_window(s, now)), None)


def floor(a: Autoscaling, r: ReplicaRange, now: datetime, idle: bool | None) -> int:
    """Fewest replicas allowed now. `idle`: no request over the idle window (None: unknown)."""
    low = r.min
    s = active_schedule(a, now)
    if s is not None:
        low = s.min_replicas
    if a.scale_to_zero_after_idle_seconds is not None:
        if idle:
            return 0
        low = max(low, 1)
    elif low == 0 and idle is False:
        # Zero replicas see no load of their own: requests reaching the tier are what wakes it.
        low = 1
    return min(low, r.max)


def recommend(a: Autoscaling, current: int, load: float) -> int:
    """Replicas the load asks for, before bounds and stabilisation."""
    if a.signal is ScalingSignal.SLO_HEADROOM:
        # load is observed latency / SLO; target is the share of the SLO to run at (e.g. 0.8).
        ratio = load / a.target
        if abs(ratio - 1) <= TOLERANCE:
            return current
        return max(1, math.ceil(max(current, 1) * ratio)) if load > 0 else current
    want = load / a.target
    if current > 0 and abs(want / current - 1) <= TOLERANCE:
        return current
    return math.ceil(want - 1e-9)


@dataclass
class History:
    """Recent recommendations of one backend, for stabilisation. Lives in the operator's memory; a
    restarted operator starts it with the replicas it found, so it never scales down before a whole
    window has passed."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, at: float, replicas: int, keep: float) -> None:
        self.entries.append((at, replicas))
        while self.entries and self.entries[0][0] < at - keep:
            self.entries.popleft()

    def since(self, at: float) -> list[int]:
        return [n for t, n in self.entries if t >= at]


def decide(
    a: Autoscaling,
    r: ReplicaRange,
    current: int,
    obs: Observation,
    history: History,
    *,
    now: datetime,
    clock: float,
) -> Decision:
    """The replicas one backend should have now, and why. Records the recommendation in `history`."""
    idle = None if obs.requests is None else obs.requests <= 0
    low, high = floor(a, r, now, idle), r.max
    keep = max(a.scale_down_stabilization_seconds, a.scale_up_stabilization_seconds)
    if obs.load is None:
        # No data: hold (never scale down on missing data), but still honour the bounds.
        held = min(max(current, low), high)
        history.add(clock, held, keep)
        why = obs.error or "no data for the load signal"
        return Decision(held, f"holding at {held}: {why}", metrics_available=False)
    wanted = min(max(recommend(a, current, obs.load), low), high)
    history.add(clock, wanted, keep)
    if wanted > current:
        window = history.since(clock - a.scale_up_stabilization_seconds)
        target = max(current, min(window))
        verb = "scaling up" if target > current else "scale-up stabilising"
    elif wanted < current:
        window = history.since(clock - a.scale_down_stabilization_seconds)
        target = min(current, max(window))
        verb = "scaling down" if target < current else "scale-down stabilising"
    else:
        target, verb = current, "steady"
    target = min(max(target, low), high)
    return Decision(target, f"{verb}: {a.signal} load {obs.load:.3g} per-replica target {a.target:g}", True)
