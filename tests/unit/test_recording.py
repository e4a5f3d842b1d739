"""The request metrics an answer updates, bound once per kind of answer: what is exported is what
updating each family by its labels would export."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from tierwise_sidecar.hotmetrics import FastCounter, FastHistogram
from tierwise_sidecar.metrics import Metrics
from tierwise_sidecar.recording import Recorder


def _backend(name: str, tier: str = "gold") -> Any:
    return SimpleNamespace(name=name, tier=tier)


def _answer(
    status: int = 200, *, backend: Any = None, route: str | None = None, estimate: float | None = None,
    segments: list[Any] | None = None, tenant: str | None = "acme",
) -> Any:  # fmt: skip
    outcome = SimpleNamespace(
        backend=backend, estimate=None if estimate is None else SimpleNamespace(usd=estimate), tier="gold",
        status=status, route=route, served_since=1.0 if backend is not None else 0.0, cached=False,
        segments=segments or [],
    )  # fmt: skip
    return SimpleNamespace(outcome=outcome, identity=SimpleNamespace(tenant=tenant, tier="gold"))


def _segment(backend: Any, prompt: int, completion: int, cached: int = 0, usd: float = 0.5) -> Any:
    return SimpleNamespace(backend=backend, input_tokens=prompt, output_tokens=completion, cached_tokens=cached,
                           usd=usd)  # fmt: skip


def _exported(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_answers_of_one_kind_share_their_series_and_others_get_their_own() -> None:
    m = Metrics()
    rec = Recorder(m)
    fast = _backend("fast")
    for _ in range(2):
        rec.record("team-a", _answer(backend=fast, route="cheap", estimate=0.25, segments=[_segment(fast, 10, 5)]),
                   0.2)  # fmt: skip
    rec.record("team-a", _answer(503), 0.1)
    text = _exported(m)
    assert 'tierwise_requests_total{backend="fast",code="200",namespace="team-a",tenant="acme",tier="gold"} 2.0' in text
    assert 'tierwise_requests_total{backend="none",code="503",namespace="team-a",tenant="acme",tier="gold"} 1.0' in text
    assert 'tierwise_request_duration_seconds_count{namespace="team-a",tier="gold"} 3.0' in text
    assert 'tierwise_route_decisions_total{backend="fast",decision="cheap",tier="gold"} 2.0' in text
    assert 'tierwise_estimated_cost_usd_total{namespace="team-a",tenant="acme",tier="gold"} 0.5' in text
    assert 'tierwise_backend_duration_seconds_count{backend="fast",namespace="team-a",tier="gold"} 2.0' in text
    assert 'kind="input",namespace="team-a",tenant="acme",tier="gold"} 20.0' in text
    assert 'kind="output",namespace="team-a",tenant="acme",tier="gold"} 10.0' in text
    assert 'tierwise_cost_usd_total{backend="fast",namespace="team-a",tenant="acme",tier="gold"} 1.0' in text


def test_a_series_no_answer_updated_is_not_exported() -> None:
    m = Metrics()
    rec = Recorder(m)
    rec.record("team-a", _answer(429), 0.01)
    text = _exported(m)
    assert "tierwise_route_decisions_total{" not in text
    assert "tierwise_backend_duration_seconds_count{" not in text
    assert "tierwise_estimated_cost_usd_total{" not in text
    assert "tierwise_tokens_total{" not in text


def test_prompt_cache_hits_are_counted_from_the_first_answer_that_reports_them() -> None:
    m = Metrics()
    rec = Recorder(m)
    fast = _backend("fast")
    rec.record("team-a", _answer(backend=fast, segments=[_segment(fast, 10, 5)]), 0.1)
    assert 'kind="cached_input"' not in _exported(m)
    rec.record("team-a", _answer(backend=fast, segments=[_segment(fast, 10, 5, cached=8)]), 0.1)
    rec.record("team-a", _answer(backend=fast, segments=[_segment(fast, 10, 5, cached=2)]), 0.1)
    assert 'kind="cached_input",namespace="team-a",tenant="acme",tier="gold"} 10.0' in _exported(m)


def test_a_bound_cell_and_the_family_update_the_same_series() -> None:
    registry = CollectorRegistry()
    counter = FastCounter("things", "Things.", ["kind"], registry)
    cell = counter.cell(("a",))
    cell[0] += 2
    counter.inc(("a",))
    assert counter.value(("a",)) == 3.0
    assert counter.value(("b",)) == 0.0
    histogram = FastHistogram("waits", "Waits.", ["kind"], (0.1, 1.0), registry)
    histogram.series(("a",)).observe(0.5)
    histogram.observe(("a",), 2.0)
    text = generate_latest(registry).decode()
    assert 'things_total{kind="a"} 3.0' in text
    assert 'waits_bucket{kind="a",le="1.0"} 1.0' in text
    assert 'waits_count{kind="a"} 2.0' in text
    assert 'waits_sum{kind="a"} 2.5' in text
