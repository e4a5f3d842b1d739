"""SLO steering decisions (pure): a slow backend drained step by step while another is healthy and
restored with hysteresis; a whole tier promoted up to its share and back; quantiles as Prometheus
computes them from summed buckets."""

from __future__ import annotations

import math
from typing import Any

from tests.cases import tier
from tierwise.api import InferenceTier, parse_object
from tierwise_operator.slomath import Grouped, backend_values, histogram_quantile, tier_values
from tierwise_operator.steering import FALLBACK, PROMOTED, TierSteer, describe, step

SLOW = {"totalP95Milliseconds": 3000.0, "errorRatePercent": 0.0}
FINE = {"totalP95Milliseconds": 200.0, "errorRatePercent": 0.0}
CLOSE = {"totalP95Milliseconds": 900.0, "errorRatePercent": 0.0}  # within the SLO, not by 20%


def spec(**kw: Any) -> Any:
    backends = [
        {
            "name": n,
            "model": "m",
            "url": "http://127.0.0.1:9/v1",
            "pricing": {"inputPerMillion": 1, "outputPerMillion": 1},
        }
        for n in ("a", "b")
    ]
    doc = tier("gold", backends=backends, slo={"totalP95Milliseconds": 1000}, **kw)
    doc["metadata"]["namespace"] = "apps"
    t = parse_object(doc)
    assert isinstance(t, InferenceTier)
    return t.spec


Cycle = tuple[dict[str, Any], dict[str, dict[str, Any]]]


def run(s: Any, cycles: list[Cycle], prev: TierSteer | None = None, start: float = 0.0) -> list[TierSteer]:
    """One cycle every 10 s from `start` (the SLO window is 300 s)."""
    out, cur = [], prev or TierSteer()
    for i, (t, b) in enumerate(cycles):
        cur = step(s, cur, t, b, start + 10 * i)
        out.append(cur)
    return out


def test_a_slow_backend_is_drained_in_steps_and_restored_without_flapping() -> None:
    s = spec()
    slow_a = (FINE, {"a": SLOW, "b": FINE})
    steps = run(s, [slow_a] * 4)
    assert [x.weights(s)["a"] for x in steps] == [1, 1, 1, 0]  # two misses per step: 1 (half of 1), then 0
    assert steps[-1].weights(s)["b"] == 1 and "totalP95Milliseconds 3000 > 1000" in steps[-1].backends["a"].why
    # Drained, it has no traffic: once a whole window has passed it is tried at half weight.
    idle = run(s, [(FINE, {"b": FINE})] * 3, steps[-1], start=30 + 290)
    assert [x.weights(s)["a"] for x in idle] == [0, 1, 1]
    # Close to the SLO holds; well inside it for three cycles restores a step.
    held = run(s, [(FINE, {"a": CLOSE, "b": FINE})] * 5, idle[-1])
    assert held[-1].backends["a"].level == 1
    back = run(s, [(FINE, {"a": FINE, "b": FINE})] * 3, held[-1])
    assert back[-1].backends["a"].level == 2 and not back[-1].steered(s)
    changes = describe(s, steps[2], steps[3])
    assert changes == [("Warning", "backend a drained: weight 1 -> 0 (totalP95Milliseconds 3000 > 1000)")]


def test_a_lone_miss_drains_nothing_and_every_backend_slow_drains_none() -> None:
    s = spec()
    blip = run(s, [(FINE, {"a": SLOW, "b": FINE}), (FINE, {"a": FINE, "b": FINE}), (FINE, {"a": SLOW, "b": FINE})])
    assert all(x.backends["a"].level == 2 for x in blip)
    both = run(s, [(SLOW, {"a": SLOW, "b": SLOW})] * 6)
    assert both[-1].weights(s) == {"a": 1, "b": 1}


def test_a_whole_tier_missing_is_promoted_up_to_its_share_and_back() -> None:
    s = spec(promotion={"borrowFrom": "platinum", "maxBorrowPercent": 30})
    slow = (SLOW, {"a": SLOW, "b": SLOW})
    up = run(s, [slow] * 4)
    assert [x.divert.percent if x.divert else 0 for x in up] == [0, 15, 15, 30]
    assert up[-1].divert is not None and (up[-1].divert.to, up[-1].divert.reason) == ("platinum", PROMOTED)
    assert "promoting 15% of the tier's traffic to platinum" in describe(s, up[0], up[1])[0][1]
    down = run(s, [(FINE, {"a": FINE, "b": FINE})] * 6, up[-1])
    assert [x.divert.percent if x.divert else 0 for x in down] == [30, 30, 15, 15, 15, 0]
    # Without a promotion, down the fallback chain.
    f = spec(fallback={"tier": "silver"})
    assert run(f, [slow] * 2)[-1].divert.reason == FALLBACK  # type: ignore[union-attr]


def test_quantiles_from_summed_buckets_as_prometheus_computes_them() -> None:
    assert histogram_quantile(0.5, {0.1: 10, 0.5: 20, math.inf: 20}) == 0.1
    assert histogram_quantile(0.95, {0.1: 0, 1.0: 100, math.inf: 100}) == 0.1 + 0.9 * 0.95
    assert histogram_quantile(0.99, {1.0: 50, math.inf: 100}) == 1.0  # in the open bucket
    assert histogram_quantile(0.5, {1.0: 0, math.inf: 0}) is None
    rows = {
        "tierwise_backend_duration_seconds": [
            ({"namespace": ns, "tier": "gold", "backend": "a", "le": le}, v)
            for ns in ("apps", "other")
            for le, v in (("0.5", 0.0), ("1", 5.0), ("+Inf", 5.0))
        ],
        "attempts": [
            ({"namespace": "apps", "tier": "gold", "backend": "a", "result": "ok"}, 9.0),
            ({"namespace": "apps", "tier": "gold", "backend": "a", "result": "timeout"}, 1.0),
            ({"namespace": "apps", "tier": "gold", "backend": "a", "result": "client_error"}, 10.0),
        ],
        "requests": [
            ({"namespace": "apps", "tier": "gold", "code": "200"}, 19.0),
            ({"namespace": "apps", "tier": "gold", "code": "502"}, 1.0),
        ],
    }
    g = Grouped(rows)
    b = backend_values(g, frozenset({"apps"}), "gold", "a")
    assert b["totalP95Milliseconds"] == 975 and b["errorRatePercent"] == 5.0
    t = tier_values(g, frozenset({"apps"}), "gold")
    assert t["availabilityPercent"] == 95.0 and t["totalP95Milliseconds"] is None
