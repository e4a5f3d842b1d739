"""Budget decisions, pure: thresholds in integer amounts, judging a reservation, the throttle's
token bucket, and the process ledger (leases, settles, rolling windows, a dry run)."""

from __future__ import annotations

import asyncio

import pytest

from tests.budgetcases import CASES, Case, rule
from tierwise.api.budget import BudgetState, Period
from tierwise.budgetrules import OK, OVER_LIMIT, THROTTLED, ZERO, Amount, BudgetRule, judge, take
from tierwise.money import Rates, cost_micros, micros_usd
from tierwise.periods import window
from tierwise_sidecar.budgets.ledger import COMPACT_SLACK, Line, MemoryLedger

NOW = 1_800_000_000.0
STAGED = {
    "limit": {"usd": 10.0, "tokens": 100_000},
    "thresholds": [
        {"percent": 50, "action": "Notify"},
        {"percent": 70, "action": "Downgrade", "downgradeTo": "silver"},
        {"percent": 80, "action": "Notify"},
        {"percent": 90, "action": "Throttle", "requestsPerSecond": 2},
        {"percent": 100, "action": "Reject"},
    ],
}


def test_money_is_integer_micro_dollars() -> None:
    from tierwise.api.tier import Pricing

    rates = Rates.of(Pricing(input_per_million=0.15, output_per_million=0.6, cached_input_per_million=0.075))
    assert (rates.input, rates.output, rates.cached) == (150_000, 600_000, 75_000)
    # 1000 input + 500 output tokens: 150 + 300 micro-dollars, exactly; estimates round up.
    assert cost_micros(rates, 1000, 500) == 450
    assert cost_micros(rates, 3, 0) == 0 and cost_micros(rates, 3, 0, up=True) == 1
    assert cost_micros(rates, 1000, 0, cached_input_tokens=1000) == 75
    # A sum of a million requests does not drift: integers.
    assert sum(cost_micros(rates, 1000, 500) for _ in range(1_000_000)) == 450_000_000
    assert micros_usd(450_000_001) == "450.000001" and micros_usd(5) == "0.000005"


def test_thresholds_become_integer_steps_and_states() -> None:
    r = rule(**STAGED)
    assert r.limit == Amount(10_000_000, 100_000)
    assert r.cap is not None and (r.cap.micros, r.cap.tokens) == (10_000_000, 100_000)
    walk = [
        (Amount(0), BudgetState.OK, None, None, 0.0),
        (Amount(5_000_000), BudgetState.WARNING, 50, None, 0.0),
        (Amount(0, 70_000), BudgetState.DOWNGRADED, 50, "silver", 0.0),  # tokens reach it first
        (Amount(8_000_000), BudgetState.DOWNGRADED, 80, "silver", 0.0),
        (Amount(9_000_000), BudgetState.THROTTLED, 80, "silver", 2.0),
        (Amount(10_000_000), BudgetState.EXCEEDED, 80, "silver", 2.0),
    ]
    for committed, state, notice, downgrade, rate in walk:
        assert (r.state(committed), r.notice(committed), r.downgrade_to(committed), r.throttle_rate(committed)) == (
            state,
            notice,
            downgrade,
            rate,
        ), committed
    assert r.remaining(Amount(12_000_000, 5)) == Amount(0, 99_995)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_judge(case: Case) -> None:
    _, spec, before, ask, outcome = case
    assert judge(rule(**spec), before, ask, None, NOW).outcome == outcome


def test_the_throttle_bucket_allows_its_rate_and_says_when() -> None:
    ok, b, _ = take(None, 2.0, NOW)
    assert ok and b.tokens == 1.0
    ok, b, _ = take(b, 2.0, NOW)
    assert ok and b.tokens == 0.0
    ok, b2, wait = take(b, 2.0, NOW + 0.1)
    assert not ok and wait == pytest.approx(0.4)
    ok, _, _ = take(b2, 2.0, NOW + 0.5)
    assert ok
    # A slow rate still lets one request through a full bucket.
    ok, b, _ = take(None, 0.1, NOW)
    assert ok and not take(b, 0.1, NOW + 1)[0]


def test_too_big_is_told_apart_from_over_the_limit() -> None:
    r = rule(limit={"usd": 1.0, "tokens": 10_000}, perRequestMax={"usd": 0.01, "tokens": 500})
    assert r.too_big(Amount(10_000, 500)) is None
    assert "per-request maximum $0.010000" in (r.too_big(Amount(10_001, 1)) or "")
    assert "per-request maximum of 500" in (r.too_big(Amount(1, 501)) or "")
    whole = rule(limit={"usd": 1.0})
    assert "more than the whole budget $1.000000" in (whole.too_big(Amount(1_000_001)) or "")


@pytest.mark.parametrize(
    "spec",
    [
        {"limit": {"usd": 1.0, "tokens": 10_000}, "perRequestMax": {"usd": 0.01, "tokens": 500}},
        {"limit": {"usd": 1.0, "tokens": 400}, "perRequestMax": {"usd": 0.5}},
        {"limit": {"tokens": 10_000}, "perRequestMax": {"usd": 0.5}},
        {"limit": {"usd": 1.0}, "perRequestMax": {"tokens": 300}},
        {"limit": {"usd": 1.0}, "thresholds": [{"percent": 80, "action": "Notify"}]},
        {"limit": {"usd": 1.0}, "thresholds": [{"percent": 150, "action": "Reject"}]},
    ],
)
def test_the_largest_ask_is_where_too_big_starts_to_refuse(spec: dict[str, object]) -> None:
    r = rule(**spec)
    micros, tokens = r.largest_ask()
    edges = (0, 300, 400, 500, 10_000, 15_000, 500_000, 10**6, 1_500_000, 2 * 10**6)
    probes = sorted({p + d for p in edges for d in (-1, 0, 1) if p + d >= 0} | {10**9})
    for m in probes:
        for t in probes:
            within = (micros is None or m <= micros) and (tokens is None or t <= tokens)
            assert (r.too_big(Amount(m, t)) is None) == within, (spec, m, t)


def _line(r: BudgetRule, ask: Amount, now: float = NOW) -> Line:
    return Line(r, window(r.period, r.time_zone, now), ask)


def test_memory_ledger_reserves_all_or_nothing_and_settles() -> None:
    async def go() -> None:
        team, platform = rule("team", limit={"usd": 1.0}), rule("all", "tierwise-system", limit={"usd": 0.5})
        ledger = MemoryLedger()
        first = await ledger.reserve([_line(team, Amount(400_000)), _line(platform, Amount(400_000))], NOW, 60)
        assert first.reservation is not None
        # The platform budget cannot take another 400k; the team's could, but nothing is held.
        second = await ledger.reserve([_line(team, Amount(400_000)), _line(platform, Amount(400_000))], NOW, 60)
        assert second.reservation is None
        assert [v.judgement.outcome for v in second.verdicts] == [OK, OVER_LIMIT]
        w = window(team.period, team.time_zone, NOW)
        assert ledger.totals(team, w).held == Amount(400_000)
        ledger.settle(first.reservation, Amount(123_456, 700), NOW)
        t = ledger.totals(team, w)
        assert (t.spent, t.held) == (Amount(123_456, 700), ZERO)
        assert ledger.totals(platform, window(platform.period, platform.time_zone, NOW)).spent == Amount(123_456, 700)

    asyncio.run(go())


def test_an_unsettled_lease_expires_and_a_late_settle_still_counts() -> None:
    async def go() -> None:
        r = rule(limit={"usd": 1.0})
        ledger = MemoryLedger()
        held = await ledger.reserve([_line(r, Amount(900_000))], NOW, 30)
        assert held.reservation is not None
        assert (await ledger.reserve([_line(r, Amount(200_000))], NOW + 29, 30)).reservation is None
        assert (await ledger.reserve([_line(r, Amount(200_000))], NOW + 31, 30)).reservation is not None
        ledger.settle(held.reservation, Amount(50_000), NOW + 40)  # after expiry: spend is never lost
        assert ledger.totals(r, window(r.period, r.time_zone, NOW)).spent == Amount(50_000)

    asyncio.run(go())


def test_settled_leases_do_not_pile_up_and_an_unsettled_one_still_expires() -> None:
    """The expiry heap keeps a settled lease's entry only until it is rebuilt: its size stays
    bounded by the leases held, whatever the traffic; a lease never settled still expires."""

    async def go() -> None:
        r = rule(limit={"usd": 1_000.0})
        ledger = MemoryLedger()
        stuck = await ledger.reserve([_line(r, Amount(1_000))], NOW, 30)
        assert stuck.reservation is not None
        for i in range(10 * COMPACT_SLACK):
            got = await ledger.reserve([_line(r, Amount(1_000))], NOW + i / 1e4, 90)
            assert got.reservation is not None
            ledger.settle(got.reservation, Amount(10), NOW + i / 1e4)
            assert len(ledger._expiry) <= 2 * ledger.leases() + COMPACT_SLACK + 1
        assert ledger.leases() == 1
        w = window(r.period, r.time_zone, NOW)
        assert ledger.totals(r, w).held == Amount(1_000)
        assert ledger.sweep(NOW + 31) == 1
        assert (ledger.leases(), ledger.totals(r, w).held) == (0, ZERO)
        assert ledger.totals(r, w).spent == Amount(10 * 10 * COMPACT_SLACK)

    asyncio.run(go())


def test_a_rolling_window_lets_spend_age_out() -> None:
    async def go() -> None:
        r = rule(period="Rolling24Hours", limit={"usd": 1.0})
        ledger = MemoryLedger()
        got = await ledger.reserve([_line(r, Amount(1_000_000))], NOW, 60)
        assert got.reservation is not None
        ledger.settle(got.reservation, Amount(1_000_000), NOW)
        assert (await ledger.reserve([_line(r, Amount(1), NOW + 3600)], NOW + 3600, 60)).reservation is None
        later = NOW + 24 * 3600 + 1800  # the bucket holding the spend has left the window
        assert (await ledger.reserve([_line(r, Amount(1), later)], later, 60)).reservation is not None
        assert r.period is Period.ROLLING_24_HOURS

    asyncio.run(go())


def test_a_dry_run_budget_is_counted_but_never_refuses() -> None:
    async def go() -> None:
        r = rule(limit={"usd": 0.1}, dryRun=True)
        ledger = MemoryLedger()
        got = await ledger.reserve([_line(r, Amount(500_000))], NOW, 60)
        assert got.reservation is not None and got.verdicts[0].judgement.outcome == OVER_LIMIT
        assert ledger.totals(r, window(r.period, r.time_zone, NOW)).held == Amount(500_000)

    asyncio.run(go())


def test_throttle_in_the_ledger() -> None:
    async def go() -> None:
        r = rule(limit={"usd": 1.0}, thresholds=[{"percent": 10, "action": "Throttle", "requestsPerSecond": 1}])
        ledger = MemoryLedger()
        seed = await ledger.reserve([_line(r, Amount(200_000))], NOW, 60)
        assert seed.reservation is not None
        ledger.settle(seed.reservation, Amount(200_000), NOW)
        outcomes = [(await ledger.reserve([_line(r, Amount(1))], NOW + i * 0.1, 60)).verdicts[0] for i in range(3)]
        assert [v.judgement.outcome for v in outcomes] == [OK, THROTTLED, THROTTLED]
        assert outcomes[1].judgement.retry_after == pytest.approx(0.9)

    asyncio.run(go())
