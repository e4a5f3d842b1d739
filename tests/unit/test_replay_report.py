"""The replay report's arithmetic on a hand-written trace: every figure computed by hand here."""

from __future__ import annotations

import pytest

from tierwise_sidecar.replay.report import (
    CACHE,
    CAUSES,
    DEGRADED,
    DOWNGRADE,
    FALLBACK,
    REFUSED,
    ROUTING,
    TIER,
    Catalog,
    Result,
    savings,
    summarize,
)

CATALOG = Catalog(
    price={"big": 10.0, "small": 1.0},
    strength={"big": 90, "small": 40},
    tier_models={"gold": ["big", "small"], "bronze": ["small"]},
    slo_s={"gold": 1.0, "bronze": None},
)

# Six requests; on the premium model each costs 0.010 (requests 0-4) or 0.020 (request 5).
PREMIUM = [Result(i, i * 0.5, "gold" if i < 3 else "bronze", 200, 0.8, 0.010 if i < 5 else 0.020, model="big",
                  label="hard" if i in (0, 3) else None, tenant="a" if i % 2 else "b") for i in range(6)]  # fmt: skip
POLICY = [
    Result(0, 0.0, "gold", 200, 0.9, 0.010, tenant="b", label="hard", served_tier="gold", model="big"),
    Result(1, 0.5, "gold", 200, 1.5, 0.001, tenant="a", served_tier="gold", model="small"),  # routing
    Result(2, 1.0, "gold", 200, 0.01, 0.0, tenant="b", served_tier="gold", cached=True),  # cache
    Result(
        3, 1.5, "bronze", 200, 0.3, 0.002, tenant="a", label="hard", served_tier="bronze", model="small", degraded=True
    ),
    Result(4, 2.0, "bronze", 429, 0.001, 0.0, tenant="b", code="rate_limit_exceeded"),
    Result(5, 2.5, "bronze", 200, 0.4, 0.003, tenant="a", served_tier="bronze", model="small"),  # tier choice
]


def test_every_figure_of_a_hand_computed_trace() -> None:
    s = summarize(POLICY, CATALOG)
    assert s.requests == 6 and s.served == 5
    assert s.cost_usd == pytest.approx(0.010 + 0.001 + 0.0 + 0.002 + 0.0 + 0.003)
    assert s.by_tier == pytest.approx({"gold": 0.011, "bronze": 0.005})
    assert s.by_tenant == pytest.approx({"b": 0.010, "a": 0.006})
    assert s.refusals == {"rate_limit_exceeded": 1}
    assert (s.cache_hits, s.degraded, s.fallbacks, s.downgraded) == (1, 1, 0, 0)
    # gold: 0.9 and 0.01 within 1 s, 1.5 not; bronze has no objective: every answer complies, the
    # refusal (#4) does not.
    assert s.slo == {"gold": (2, 3), "bronze": (2, 3)}
    assert s.compliance("bronze") == pytest.approx(2 / 3)
    assert s.compliance("gold") == pytest.approx(2 / 3)
    # Hard requests: #0 on big (strong), #3 on small (not).
    assert s.hard_on_strong == (1, 2)
    p = summarize(PREMIUM, CATALOG)
    assert p.cost_usd == pytest.approx(0.070) and p.compliance("gold") == 1.0 and p.hard_on_strong == (2, 2)


def test_the_saving_by_cause_adds_up_to_the_total() -> None:
    by = savings(POLICY, PREMIUM, CATALOG)
    assert set(by) == set(CAUSES)
    assert by[CACHE] == pytest.approx(0.010)
    assert by[ROUTING] == pytest.approx(0.009)
    assert by[DEGRADED] == pytest.approx(0.008)
    assert by[REFUSED] == pytest.approx(0.010)
    assert by[TIER] == pytest.approx(0.000 + 0.017)  # #0 (big on gold: nothing saved) and #5
    assert by[DOWNGRADE] == by[FALLBACK] == 0.0
    total = summarize(PREMIUM, CATALOG).cost_usd - summarize(POLICY, CATALOG).cost_usd
    assert sum(by.values()) == pytest.approx(total) == pytest.approx(0.054)
