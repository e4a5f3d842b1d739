"""A sidecar without Redis counts the spend the operator publishes beside the Policy as the other
sidecars' spend, in the same period only, without counting its own twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.budgetcases import rule
from tierwise.budgetrules import Amount
from tierwise.periods import window
from tierwise_sidecar.budgets.ledger import Line, MemoryLedger
from tierwise_sidecar.budgets.published import Published

NOW = 1_764_763_200.0  # 2025-12-03T12:00:00Z


def publish(path: Path, key: str, window_id: str, micros: int) -> None:
    data = {"budgets": {key: {"window": window_id, "spentMicros": micros, "spentTokens": 0, "state": "Ok"}}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # as the kubelet swaps a ConfigMap mount: a new file, not an edit


def test_the_others_spend_counts_and_a_reservation_past_the_limit_is_refused(tmp_path: Path) -> None:
    r = rule("hard", limit={"usd": 1.0})
    w = window(r.period, r.time_zone, NOW)
    path = tmp_path / "budgets.json"
    published = Published(path, interval=1)
    ledger = MemoryLedger()
    ledger.base = published.base(ledger)

    async def spend(micros: int) -> bool:
        booking = await ledger.reserve([Line(r, w, Amount(micros))], NOW, 60)
        if booking.reservation is None:
            return False
        ledger.settle(booking.reservation, Amount(micros), NOW)
        return True

    assert asyncio.run(spend(300_000))  # this sidecar alone: $0.30
    published.refresh()  # nothing published yet: it counts alone
    assert ledger.totals(r, w).spent == Amount(300_000)
    # The operator saw $0.80 across the sidecars, this one's $0.30 included: the others spent $0.50.
    publish(path, r.key, w.id, 800_000)
    published.refresh()
    assert ledger.totals(r, w).spent == Amount(800_000)
    assert asyncio.run(spend(150_000))  # $0.95 of $1
    assert not asyncio.run(spend(100_000))  # would pass the limit with the others' spend
    assert ledger.totals(r, w).spent == Amount(950_000)


def test_another_period_a_missing_or_broken_file_counts_nothing(tmp_path: Path) -> None:
    r = rule("hard", limit={"usd": 1.0})
    w = window(r.period, r.time_zone, NOW)
    path = tmp_path / "budgets.json"
    published = Published(path, interval=1)
    ledger = MemoryLedger()
    ledger.base = published.base(ledger)
    publish(path, r.key, "Monthly:0", 900_000)  # a period that is over
    published.refresh()
    assert ledger.totals(r, w).spent == Amount(0)
    publish(path, r.key, w.id, 900_000)
    published.refresh()
    assert ledger.totals(r, w).spent == Amount(900_000)
    path.write_text("{not json")
    published.refresh()  # kept: a broken file is ignored, with a warning
    assert ledger.totals(r, w).spent == Amount(900_000)
    path.unlink()
    published.refresh()  # gone: nothing published
    assert ledger.totals(r, w).spent == Amount(0)


def test_published_steering_is_bounded_and_a_broken_file_keeps_the_last(tmp_path: Path) -> None:
    from tierwise_sidecar.steer import Steering

    path = tmp_path / "steering.json"
    path.write_text(json.dumps({"tiers": {"gold": {"weights": {"a": -5, "b": 3},
                                                   "divert": {"to": "platinum", "percent": 400}}}}))  # fmt: skip
    s = Steering(path, interval=1)
    s.refresh()
    gold = s.value["gold"]
    assert dict(gold.weights) == {"a": 0, "b": 3} and gold.percent == 100 and gold.to == "platinum"
    path.write_text('{"tiers": {"gold": {"weights": {"a": "x"}}}}')
    s.refresh()
    assert s.value["gold"] is gold  # kept, with a warning
