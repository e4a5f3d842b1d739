"""Budget decisions, pure: which budgets count a request, where their spend stands against their
thresholds, whether a reservation fits, and how that is told to the caller.

A CostBudget becomes a BudgetRule once per Policy: its limit and every threshold in integer
micro-dollars and tokens. Thresholds act in ascending order of percent: Notify (a header and a
metric), Downgrade (the request goes to a cheaper tier), Throttle (the budget's traffic limited to
a rate) and Reject (the hard cap: no reservation may take committed spend past it). Committed
spend is what is settled plus what requests in flight hold. The same `judge` runs in the memory
ledger and, mirrored in Lua, in Redis; both are tested against one table of cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierwise import buckets
from tierwise.api.budget import BudgetState, Period, ThresholdAction
from tierwise.buckets import Bucket
from tierwise.money import micros_usd, usd_micros
from tierwise.policy import PolicyBudget
from tierwise.values import value

OK, OVER_LIMIT, THROTTLED = "ok", "over_limit", "throttled"


@value
class Amount:
    micros: int = 0
    tokens: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.micros + other.micros, self.tokens + other.tokens)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.micros - other.micros, self.tokens - other.tokens)


ZERO = Amount()


@dataclass(frozen=True, slots=True)
class Step:
    """A threshold in absolute terms: reached when committed spend is at or past it in either unit."""

    percent: int
    micros: int | None
    tokens: int | None

    def reached(self, committed: Amount) -> bool:
        return (self.micros is not None and committed.micros >= self.micros) or (
            self.tokens is not None and committed.tokens >= self.tokens
        )


def _step(percent: int, limit_micros: int | None, limit_tokens: int | None) -> Step:
    return Step(
        percent,
        None if limit_micros is None else limit_micros * percent // 100,
        None if limit_tokens is None else limit_tokens * percent // 100,
    )


@dataclass(frozen=True, slots=True)
class BudgetRule:
    key: str  # "<namespace>/<name>": the same in every sidecar and across reloads
    period: Period
    time_zone: str
    limit: Amount  # a unit without a limit is 0 here and None in the steps
    has_usd: bool
    has_tokens: bool
    cap: Step | None  # the first Reject threshold; None: the budget never refuses
    throttles: tuple[tuple[Step, float], ...]  # ascending, with their requests per second
    downgrades: tuple[tuple[Step, str], ...]
    notices: tuple[Step, ...]
    per_request: Amount | None
    per_request_usd: bool
    per_request_tokens: bool
    tenants: frozenset[str]
    tiers: frozenset[str]
    dry_run: bool

    def counts(self, tenant: str | None, tier: str) -> bool:
        return (not self.tenants or tenant in self.tenants) and (not self.tiers or tier in self.tiers)

    def throttle_rate(self, committed: Amount) -> float:
        """Requests per second the budget's traffic is held to now; 0: not throttled."""
        rate = 0.0
        for step, rps in self.throttles:
            if step.reached(committed):
                rate = rps
        return rate

    def downgrade_to(self, committed: Amount) -> str | None:
        to = None
        for step, tier in self.downgrades:
            if step.reached(committed):
                to = tier
        return to

    def notice(self, committed: Amount) -> int | None:
        """The highest Notify percent reached."""
        hit = [s.percent for s in self.notices if s.reached(committed)]
        return hit[-1] if hit else None

    def state(self, committed: Amount) -> BudgetState:
        if self.cap is not None and self.cap.reached(committed):
            return BudgetState.EXCEEDED
        if self.throttle_rate(committed):
            return BudgetState.THROTTLED
        if self.downgrade_to(committed) is not None:
            return BudgetState.DOWNGRADED
        if self.notice(committed) is not None:
            return BudgetState.WARNING
        return BudgetState.OK

    def crossed(self, committed: Amount) -> int | None:
        """The highest threshold percent reached, whatever its action."""
        steps = [*self.notices, *(s for s, _ in self.downgrades), *(s for s, _ in self.throttles)]
        if self.cap is not None:
            steps.append(self.cap)
        hit = [s.percent for s in steps if s.reached(committed)]
        return max(hit) if hit else None

    def remaining(self, committed: Amount) -> Amount:
        return Amount(max(self.limit.micros - committed.micros, 0), max(self.limit.tokens - committed.tokens, 0))

    def largest_ask(self) -> tuple[int | None, int | None]:
        """The largest ask `too_big` lets through, in micro-dollars and in tokens (None: no bound in
        that unit): a request within both needs no message and no loop over the rules."""
        micros = tokens = None
        pr = self.per_request
        if pr is not None:
            micros = pr.micros if self.per_request_usd else None
            tokens = pr.tokens if self.per_request_tokens else None
        cap = self.cap
        if cap is not None:
            if cap.micros is not None:
                micros = cap.micros if micros is None else min(micros, cap.micros)
            if cap.tokens is not None:
                tokens = cap.tokens if tokens is None else min(tokens, cap.tokens)
        return micros, tokens

    def too_big(self, ask: Amount) -> str | None:
        """Why one request can never fit (its own maximum, or more than the whole cap), or None."""
        pr = self.per_request
        if pr is not None:
            if self.per_request_usd and ask.micros > pr.micros:
                limit = micros_usd(pr.micros)
                return f"its worst case ${micros_usd(ask.micros)} is above the per-request maximum ${limit}"
            if self.per_request_tokens and ask.tokens > pr.tokens:
                return f"its worst case of {ask.tokens} tokens is above the per-request maximum of {pr.tokens}"
        cap = self.cap
        if cap is not None:
            if cap.micros is not None and ask.micros > cap.micros:
                return (
                    f"its worst case ${micros_usd(ask.micros)} is more than the whole budget ${micros_usd(cap.micros)}"
                )
            if cap.tokens is not None and ask.tokens > cap.tokens:
                return f"its worst case of {ask.tokens} tokens is more than the whole budget of {cap.tokens}"
        return None


def rule_of(b: PolicyBudget) -> BudgetRule:
    s = b.spec
    lm = usd_micros(s.limit.usd) if s.limit.usd is not None else None
    lt = s.limit.tokens
    steps = sorted(s.thresholds, key=lambda t: t.percent)
    rejects = [t for t in steps if t.action is ThresholdAction.REJECT]
    pr = s.per_request_max
    return BudgetRule(
        key=f"{b.namespace}/{b.name}",
        period=s.period,
        time_zone=s.time_zone,
        limit=Amount(lm or 0, lt or 0),
        has_usd=lm is not None,
        has_tokens=lt is not None,
        cap=_step(rejects[0].percent, lm, lt) if rejects else None,
        throttles=tuple(
            (_step(t.percent, lm, lt), float(t.requests_per_second or 0))
            for t in steps
            if t.action is ThresholdAction.THROTTLE
        ),
        downgrades=tuple(
            (_step(t.percent, lm, lt), t.downgrade_to or "") for t in steps if t.action is ThresholdAction.DOWNGRADE
        ),
        notices=tuple(_step(t.percent, lm, lt) for t in steps if t.action is ThresholdAction.NOTIFY),
        per_request=Amount(usd_micros(pr.usd) if pr and pr.usd else 0, pr.tokens or 0) if pr else None,
        per_request_usd=bool(pr and pr.usd is not None),
        per_request_tokens=bool(pr and pr.tokens is not None),
        tenants=frozenset(s.selector.tenants),
        tiers=frozenset(s.selector.tiers),
        dry_run=s.dry_run,
    )


# ------------------------------------------------------------------ throttling


def take(bucket: Bucket | None, rate: float, now: float) -> tuple[bool, Bucket, float]:
    """Take one request from a bucket refilled at `rate` per second, holding at most one second's
    worth (and at least one). Returns (allowed, the bucket after, seconds until one is free)."""
    return buckets.take(bucket, rate, max(1.0, rate), 1.0, now)


# ------------------------------------------------------------------ judging a reservation


@value
class Judgement:
    outcome: str  # OK, OVER_LIMIT or THROTTLED
    bucket: Bucket | None = None  # the throttle bucket after taking, when throttled traffic passes
    retry_after: float = 0.0


def judge(rule: BudgetRule, committed: Amount, ask: Amount, bucket: Bucket | None, now: float) -> Judgement:
    """May `ask` be reserved on top of `committed` (settled plus in flight)?"""
    cap = rule.cap
    if cap is not None and (
        (cap.micros is not None and committed.micros + ask.micros > cap.micros)
        or (cap.tokens is not None and committed.tokens + ask.tokens > cap.tokens)
    ):
        return Judgement(OVER_LIMIT)
    rate = rule.throttle_rate(committed)
    if rate:
        allowed, after, wait = take(bucket, rate, now)
        return Judgement(OK, after) if allowed else Judgement(THROTTLED, None, wait)
    return Judgement(OK)
