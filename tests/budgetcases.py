"""Budget rules for tests, and one table of judgements every ledger must agree with (the memory
ledger, and the Lua scripts in a real Redis)."""

from __future__ import annotations

from typing import Any

from tierwise.api.budget import CostBudgetSpec
from tierwise.budgetrules import OK, OVER_LIMIT, Amount, BudgetRule, rule_of
from tierwise.periods import window
from tierwise.policy import PolicyBudget
from tierwise_sidecar.budgets.ledger import Line

NOW = 1_800_000_000.0


def rule(name: str = "b", namespace: str = "apps", **spec: Any) -> BudgetRule:
    spec.setdefault("limit", {"usd": 1.0})
    return rule_of(PolicyBudget(name=name, namespace=namespace, spec=CostBudgetSpec.model_validate(spec)))


def line(r: BudgetRule, ask: Amount, now: float = NOW) -> Line:
    """One budget's part of a reservation at `now`."""
    return Line(r, window(r.period, r.time_zone, now), ask)


USD = Amount
THROTTLED_AT_HALF: dict[str, Any] = {
    "thresholds": [
        {"percent": 50, "action": "Throttle", "requestsPerSecond": 0.5},
        {"percent": 100, "action": "Reject"},
    ]
}
# (case, rule spec, committed before (settled), ask, outcome)
Case = tuple[str, dict[str, Any], Amount, Amount, str]
CASES: list[Case] = [
    ("fits", {}, USD(0), USD(500_000), OK),
    ("fits exactly", {}, USD(400_000), USD(600_000), OK),
    ("one micro-dollar over", {}, USD(400_001), USD(600_000), OVER_LIMIT),
    ("spent all", {}, USD(1_000_000), USD(1), OVER_LIMIT),
    (
        "reject below 100%",
        {"thresholds": [{"percent": 80, "action": "Reject"}]},
        USD(700_000),
        USD(100_001),
        OVER_LIMIT,
    ),
    (
        "no reject threshold never refuses",
        {"thresholds": [{"percent": 50, "action": "Notify"}]},
        USD(5_000_000),
        USD(1_000_000),
        OK,
    ),
    ("tokens cap", {"limit": {"tokens": 1000}}, USD(0, 900), USD(0, 101), OVER_LIMIT),
    ("tokens fit", {"limit": {"tokens": 1000}}, USD(0, 900), USD(0, 100), OK),
    ("either unit caps", {"limit": {"usd": 1.0, "tokens": 1000}}, USD(10, 990), USD(10, 11), OVER_LIMIT),
    ("dry run judged over", {"dryRun": True}, USD(1_000_000), USD(1), OVER_LIMIT),
    (
        "throttled: first request passes (a full bucket)",
        THROTTLED_AT_HALF,
        USD(600_000),
        USD(1000),
        OK,
    ),
    (
        "below the throttle level: no bucket",
        THROTTLED_AT_HALF,
        USD(100_000),
        USD(1000),
        OK,
    ),
]
