"""A budget's status from its spend as last observed (pure): spent, reserved, remaining, the
projection to the period's end, the state the sidecars act on, the period's start, and the Events
a threshold crossing posts (once per crossing per period: the highest threshold reached is kept in
the status, so a restarted operator does not post it again). Nothing here changes with the clock
alone, so an idle budget's status compares equal and nothing is written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from tierwise.api.budget import BudgetState
from tierwise.budgetrules import Amount, BudgetRule
from tierwise.money import MICROS_PER_USD
from tierwise.periods import Window
from tierwise_operator.status import Obj, condition, merge_conditions, validity_status

SPEND_CONDITION = "SpendObserved"
# A projection from the first minutes of a period says more about noise than about the period.
MIN_PROJECTION_SECONDS = 300
_BAD_STATES = (BudgetState.DOWNGRADED, BudgetState.THROTTLED, BudgetState.EXCEEDED)


@dataclass(frozen=True)
class Spend:
    """One budget's spend in one period, as read from Redis or Prometheus."""

    window_id: str
    spent: Amount
    held: Amount
    source: str  # "Redis" or "Prometheus"
    at: float  # when it was read (epoch seconds)


@dataclass(frozen=True)
class Reading:
    """What the spend observer knows of a budget: the last good read, and why the latest failed."""

    last: Spend | None = None
    error: str | None = None
    failed_since: float | None = None
    unconfigured: bool = False  # neither Redis nor Prometheus: nothing will ever be read


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)


def spend_fields(rule: BudgetRule, w: Window, s: Spend) -> Obj:
    committed = s.spent + s.held
    left = rule.remaining(committed)
    out: Obj = {
        "spentUsd": usd(s.spent.micros),
        "reservedUsd": usd(s.held.micros),
        "spentTokens": s.spent.tokens,
        "reservedTokens": s.held.tokens,
        "state": rule.state(committed).value,
        "periodStart": iso(w.start),
        "crossedPercent": rule.crossed(committed),
    }
    if rule.has_usd:
        out["remainingUsd"] = usd(left.micros)
    if rule.has_tokens:
        out["remainingTokens"] = left.tokens
    if not w.rolling:
        out["lastReset"] = iso(w.start)
        elapsed = s.at - w.start
        if elapsed >= MIN_PROJECTION_SECONDS:
            # Whole minutes of elapsed time: the projection moves when spend moves, not every cycle.
            elapsed = elapsed // 60 * 60
            out["projectedUsd"] = usd(round(s.spent.micros * (w.end - w.start) / elapsed))
    return {k: v for k, v in out.items() if v is not None}


def budget_status(
    judged: tuple[BudgetRule, Window] | None,
    reading: Reading,
    *,
    old: Obj,
    problems: Sequence[str],
    generation: int,
    now: str,
) -> tuple[Obj, list[tuple[str, str, str]]]:
    """The new status and the Events (type, reason, message) it posts. `judged`: the budget as the
    sidecars judge it and its current period; None when it cannot be (validity says why)."""
    base = validity_status(old, problems, generation, now)
    if judged is None:
        return base, []
    rule, w = judged
    fields = {k: v for k, v in base.items() if k in ("observedGeneration", "conditions")}
    last = reading.last
    if last is None or last.window_id != w.id:
        # Nothing read for this period yet: what was shown stays, and the condition says so.
        spend = {k: v for k, v in old.items() if k not in ("observedGeneration", "conditions")}
    else:
        spend = spend_fields(rule, w, last)
    seen = _spend_condition(reading, w, generation)
    others = [c for c in fields["conditions"] if c.get("type") != SPEND_CONDITION]
    new = {**spend, **fields, "conditions": [*others, *merge_conditions(old.get("conditions", []), [seen], now)]}
    return new, _crossings(rule, old, new)


def _spend_condition(reading: Reading, w: Window, generation: int) -> Obj:
    last = reading.last
    if reading.unconfigured:
        message = "no spend source: start the operator with --redis-url or --prometheus-url"
        return condition(SPEND_CONDITION, False, "NoSource", message, generation)
    if reading.error is None and last is not None and last.window_id == w.id:
        return condition(SPEND_CONDITION, True, last.source, f"spend read from {last.source}", generation)
    if reading.error is None:
        return condition(SPEND_CONDITION, None, "NotYetObserved", "no spend read for this period yet", generation)
    since = f" since {iso(reading.failed_since)}" if reading.failed_since is not None else ""
    kept = (
        f"; the status and the state sent to the sidecars are those read at {iso(last.at)}"
        if last is not None
        else "; nothing was read yet"
    )
    reason = "StoreUnavailable" if last is None else f"{last.source}Unavailable"
    return condition(SPEND_CONDITION, False, reason, f"stale{since}: {reading.error}{kept}", generation)


def _crossings(rule: BudgetRule, old: Obj, new: Obj) -> list[tuple[str, str, str]]:
    crossed = new.get("crossedPercent")
    if crossed is None:
        return []
    same_period = old.get("periodStart") == new.get("periodStart")
    if same_period and (old.get("crossedPercent") or 0) >= crossed:
        return []
    state = BudgetState(new["state"])
    spent = f"${new['spentUsd']}" if rule.has_usd else f"{new['spentTokens']} tokens"
    return [
        (
            "Warning" if state in _BAD_STATES else "Normal",
            "ThresholdCrossed",
            f"spend reached the {crossed}% threshold ({spent} spent, state {state.value})",
        )
    ]
