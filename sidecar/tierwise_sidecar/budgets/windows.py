"""Which budgets count a request, and the windows they count it in, worked out once rather than
per request: a budget's current window until it moves on, and per (tenant, tier) of a Policy the
budgets that count it with what they need on each of its requests."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierwise.budgetrules import BudgetRule
from tierwise.periods import Window, window

# (tenant, tier) pairs kept per Policy; cleared when full.
COUNTING_MAX = 4096


class Windows:
    """Each budget's current window, recomputed only when it moves on (the time zone arithmetic
    is not redone for every request)."""

    def __init__(self) -> None:
        # Per budget: its window, and the instant from which it is the current one (a rolling
        # window's newest bucket's start: the window slides on at the next bucket).
        self._cache: dict[str, tuple[Window, float]] = {}

    def __call__(self, rule: BudgetRule, now: float) -> Window:
        return self.current(rule, now)[0]

    def current(self, rule: BudgetRule, now: float) -> tuple[Window, float]:
        """The budget's window at `now`, and the instant from which it is the current one (it is
        until its end)."""
        hit = self._cache.get(rule.key)
        if hit is not None:
            w, since = hit
            if since <= now < w.end and w.period is rule.period:
                return hit
        w = window(rule.period, rule.time_zone, now)
        hit = self._cache[rule.key] = (w, w.last_bucket * w.bucket_seconds if w.rolling else w.start)
        return hit


# An ask no rule bounds in a unit: above any amount the API allows.
UNBOUNDED = 2**63


@dataclass(slots=True)
class Counted:
    """What the budgets that count one (tenant, tier) need on each of its requests, worked out
    once per Policy: the rules, their windows while none of them moves on, and the largest ask
    none of them refuses outright (so a request within it skips their per-request checks)."""

    rules: tuple[BudgetRule, ...]
    max_micros: int = UNBOUNDED
    max_tokens: int = UNBOUNDED
    # Each rule's window, all current from `since` until `until`.
    windows: tuple[Window, ...] = ()
    since: float = math.inf
    until: float = -math.inf

    @classmethod
    def of(cls, rules: tuple[BudgetRule, ...]) -> Counted:
        c = cls(rules)
        for r in rules:
            micros, tokens = r.largest_ask()
            if micros is not None and micros < c.max_micros:
                c.max_micros = micros
            if tokens is not None and tokens < c.max_tokens:
                c.max_tokens = tokens
        return c

    def current(self, windows: Windows, now: float) -> tuple[Window, ...]:
        if self.since <= now < self.until:
            return self.windows
        since, until, ws = -math.inf, math.inf, []
        for r in self.rules:
            w, from_ = windows.current(r, now)
            ws.append(w)
            since, until = max(since, from_), min(until, w.end)
        self.windows, self.since, self.until = tuple(ws), since, until
        return self.windows
