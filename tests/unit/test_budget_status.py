"""A CostBudget's status from its observed spend (pure): the numbers, the state, the projection,
one Event per threshold crossing per period, a new period, a stale source, and no change (so no
write) while nothing happens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.cases import budget
from tierwise.api import CostBudget, parse_object
from tierwise.budgetrules import Amount, rule_of
from tierwise.periods import window
from tierwise.policy import PolicyBudget
from tierwise_operator.budgetstatus import Reading, Spend, budget_status
from tierwise_operator.status import status_changed

NOW = "2026-12-03T12:00:00Z"
DAY = datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp()
THRESHOLDS = [
    {"percent": 50, "action": "Notify"},
    {"percent": 80, "action": "Throttle", "requestsPerSecond": 1},
    {"percent": 100, "action": "Reject"},
]


def judged(**spec: Any) -> tuple[Any, Any]:
    doc = budget("team", **{"period": "Daily", "limit": {"usd": 10, "tokens": 1_000_000}, **spec})
    doc["metadata"]["namespace"] = "apps"
    b = parse_object(doc)
    assert isinstance(b, CostBudget)
    rule = rule_of(PolicyBudget(name=b.name, namespace=b.namespace, spec=b.spec))
    return rule, window(b.spec.period, b.spec.time_zone, DAY)


def status(j: tuple[Any, Any], reading: Reading, old: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    return budget_status(j, reading, old=old or {}, problems=[], generation=3, now=NOW)


def spend(j: tuple[Any, Any], usd: float, held: float = 0, at: float = DAY, tokens: int = 0) -> Reading:
    w = j[1]
    return Reading(Spend(w.id, Amount(round(usd * 1e6), tokens), Amount(round(held * 1e6), 0), "Prometheus", at))


def conditions(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in s["conditions"]}


def test_numbers_state_and_projection() -> None:
    j = judged(thresholds=THRESHOLDS)
    s, events = status(j, spend(j, 4.5, held=1.0, tokens=1234))
    assert s["spentUsd"] == 4.5 and s["reservedUsd"] == 1.0 and s["remainingUsd"] == 4.5
    assert s["spentTokens"] == 1234 and s["remainingTokens"] == 1_000_000 - 1234
    assert s["state"] == "Warning" and s["crossedPercent"] == 50  # committed 5.5 of 10
    assert s["periodStart"] == "2026-12-03T00:00:00Z" == s["lastReset"]
    assert s["projectedUsd"] == 9.0  # $4.5 in half the day
    assert conditions(s)["Ready"]["status"] == "True" and conditions(s)["SpendObserved"]["reason"] == "Prometheus"
    assert s["observedGeneration"] == 3
    assert events == [("Normal", "ThresholdCrossed", "spend reached the 50% threshold ($4.5 spent, state Warning)")]


def test_one_event_per_crossing_per_period_and_none_while_idle() -> None:
    j = judged(thresholds=THRESHOLDS)
    s1, e1 = status(j, spend(j, 5.1))
    s2, e2 = status(j, spend(j, 6.0), s1)  # still past 50% only: no new crossing
    assert len(e1) == 1 and e2 == []
    s3, e3 = status(j, spend(j, 8.2), s2)
    assert s3["state"] == "Throttled" and e3[0][0] == "Warning" and "80%" in e3[0][2]
    # The same reading again (an idle budget, or a restarted operator): nothing to write or post.
    s4, e4 = status(j, spend(j, 8.2), s3)
    assert e4 == [] and not status_changed(s3, s4)


def test_a_new_period_resets_the_status_and_crossings_count_again() -> None:
    j = judged(thresholds=THRESHOLDS)
    before, _ = status(j, spend(j, 9.0))
    rule, today = j
    tomorrow = window(today.period, "UTC", today.end + 60)
    nxt = (rule, tomorrow)
    fresh, events = status(nxt, spend(nxt, 0.0, at=today.end + 60), before)
    assert fresh["spentUsd"] == 0 and fresh["state"] == "Ok" and "crossedPercent" not in fresh
    assert fresh["periodStart"] == fresh["lastReset"] == "2026-12-04T00:00:00Z" and events == []
    again, events = status(nxt, spend(nxt, 5.5, at=today.end + 3600), fresh)
    assert len(events) == 1 and again["crossedPercent"] == 50


def test_a_stale_source_keeps_the_last_status_and_says_since_when() -> None:
    j = judged(thresholds=THRESHOLDS)
    good, _ = status(j, spend(j, 6.0))
    last = spend(j, 6.0).last
    stale, events = status(j, Reading(last, "Prometheus unavailable: connection refused", DAY + 60), good)
    assert {k: v for k, v in stale.items() if k != "conditions"} == {k: v for k, v in good.items() if k != "conditions"}
    c = conditions(stale)["SpendObserved"]
    assert (c["status"], c["reason"]) == ("False", "PrometheusUnavailable")
    assert "stale since 2026-12-03T12:01:00Z" in c["message"] and "connection refused" in c["message"]
    assert events == []
    # Recovered: the condition turns back.
    back, _ = status(j, spend(j, 6.5), stale)
    assert conditions(back)["SpendObserved"]["status"] == "True"


def test_no_source_is_said_and_a_rolling_window_has_no_projection() -> None:
    j = judged()
    s, _ = status(j, Reading(unconfigured=True))
    assert conditions(s)["SpendObserved"]["reason"] == "NoSource" and "spentUsd" not in s
    r = judged(period="Rolling24Hours")
    s, _ = status(r, spend(r, 1.0))
    assert "projectedUsd" not in s and "lastReset" not in s and s["spentUsd"] == 1.0


def test_a_budget_that_cannot_be_judged_reports_only_its_validity() -> None:
    s, events = budget_status(None, Reading(), old={}, problems=["spec.timeZone: not an IANA time zone"],
                              generation=1, now=NOW)  # fmt: skip
    assert conditions(s)["Ready"]["reason"] == "InvalidSpec" and "state" not in s and events == []
