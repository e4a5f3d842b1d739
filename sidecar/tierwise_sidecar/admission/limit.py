"""How many requests one upstream target may have in flight: fixed, or learnt as TCP learns a
window (additive increase, multiplicative decrease), judged once per window of samples.

A window is congested when the target said it was busy (a 429, a 503, a timeout), when more than
5 % of its answers were slower than their tier's p95 objective, or when its answers were slower
than the target's own recent best by more than QUEUE_TOLERANCE (requests queueing inside it: a
model server at its batch size makes the extra requests wait). A congested window multiplies the
limit by DECREASE; a clean window in which the limit was actually reached raises it by about the
square root of the limit, so a large target finds its level in a few dozen windows and a small one
does not overshoot by much. While the sidecar's own event loop lags (lag.py), latency is not held
against the target: only its 429s, 503s and timeouts are. As TCP cuts its window once per round
trip, answers to requests sent before the last cut are not judged again: a burst of 429s is one
cut, not a collapse to the floor. An idle target keeps its limit: nothing was learnt.

Latency is compared within its kind: a stream's time to first byte, a whole answer's time per
token it generated (a long answer is not a slow target). The best of a kind is the minimum over
the last two baseline epochs, so a target that became slower for good (a bigger model behind the
URL) is not taken for a queueing one for longer than two epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DECREASE = 0.8
QUEUE_TOLERANCE = 2.0
# Latency above the target's best by less than this (seconds, of the whole answer or first byte)
# is not queueing in it: at that scale it is the sidecar's own lateness (lag.TOLERANCE) or the
# scheduling of a busy node. Queueing inside a model server costs a generation step or more.
QUEUE_FLOOR_SECONDS = 0.005
OVER_SLO_SHARE = 0.05
MIN_WINDOW_SECONDS = 0.25
MIN_WINDOW_SAMPLES = 8
MAX_WINDOW_SECONDS = 2.0
BASELINE_EPOCH_SECONDS = 10.0
MAX_RATIOS = 64


@dataclass(slots=True)
class Baseline:
    """The least latency of one kind seen over the current and the previous epoch."""

    current: float = math.inf
    previous: float = math.inf
    since: float = 0.0

    def see(self, value: float, now: float) -> float:
        if now - self.since >= BASELINE_EPOCH_SECONDS:
            self.previous, self.current, self.since = self.current, math.inf, now
        self.current = min(self.current, value)
        return min(self.current, self.previous)


@dataclass(slots=True)
class Window:
    start: float = 0.0
    samples: int = 0
    busy: int = 0
    over: int = 0
    reached: bool = False
    ratios: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Limit:
    """The limit of one target. `adaptive` False: `value` stays what the Policy says."""

    value: float
    floor: float = 1.0
    ceiling: float = 1000.0
    adaptive: bool = True
    window: Window = field(default_factory=Window)
    baselines: dict[str, Baseline] = field(default_factory=dict)
    # The outcome of the last judged window, for metrics and for shedding: True while congested.
    congested: bool = False
    # When the limit was last cut: an answer to a request sent before then tells of the old limit.
    cut_at: float = -math.inf
    # The highest limit known to be within the target's capacity (none known until a first cut):
    # slots above it are probes, which the waiting room hands to its lowest-ranked waiters.
    safe: float = math.inf
    decreases: int = 0
    increases: int = 0

    @property
    def slots(self) -> int:
        # Read a few times per request: a comparison rather than a max() call.
        n = int(self.value)
        return n if n > 1 else 1

    def reached(self, in_flight: int) -> None:
        """A request took a slot with `in_flight` in flight: was the limit used in this window?"""
        if in_flight >= self.slots:
            self.window.reached = True

    def observe(self, kind: str, seconds: float, *, busy: bool, over_slo: bool, now: float,
                lagging: bool = False, scale: float = 1.0) -> None:  # fmt: skip
        """One attempt's answer (or failure) from the target. `lagging`: the sidecar's own loop runs
        late, so the latency measured is partly its own: only what the target says counts. `scale`:
        how many of `seconds` make the answer's whole latency (its tokens, for a time per token)."""
        if not self.adaptive or now - seconds < self.cut_at:
            return
        if lagging and not busy:
            over_slo, seconds = False, 0.0
        w = self.window
        if w.samples == 0 and w.busy == 0:
            w.start = now
        w.samples += 1
        if busy:
            w.busy += 1
        elif seconds > 0:
            if over_slo:
                w.over += 1
            baseline = self.baselines.get(kind)
            if baseline is None:
                baseline = self.baselines[kind] = Baseline(since=now)
            best = baseline.see(seconds, now)
            if len(w.ratios) < MAX_RATIOS and best > 0:
                w.ratios.append(seconds / best if (seconds - best) * scale > QUEUE_FLOOR_SECONDS else 1.0)
        elapsed = now - w.start
        if (elapsed >= MIN_WINDOW_SECONDS and w.samples >= MIN_WINDOW_SAMPLES) or elapsed >= MAX_WINDOW_SECONDS or busy:
            self._judge(now)

    def _judge(self, now: float) -> None:
        w = self.window
        queued = bool(w.ratios) and _median(w.ratios) > QUEUE_TOLERANCE
        self.congested = w.busy > 0 or w.over > OVER_SLO_SHARE * w.samples or queued
        if self.congested:
            self.value = max(self.floor, self.value * DECREASE)
            self.safe = self.value
            self.cut_at = now
            self.decreases += 1
        elif w.reached:
            self.safe = max(self.safe, self.value) if math.isfinite(self.safe) else self.safe
            self.value = min(self.ceiling, self.value + max(1.0, math.sqrt(self.value) / 2))
            self.increases += 1
        self.window = Window()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
