"""The replay's events from a trace meta: the outage names the model behind the tier, the budget
takes the Policy's staged thresholds and stacks on its budgets; the compressed clock scales a
budget's Throttle rate with the rest."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tierwise.api.budget import Period, ThresholdAction
from tierwise.policy import Policy
from tierwise_sidecar.fake_backend import FakeBackend, FakeConfig
from tierwise_sidecar.policy_source import CrFolder, PolicyLoadError
from tierwise_sidecar.replay.command import meta_path
from tierwise_sidecar.replay.events import DEFAULT_THRESHOLDS, Outage, events_of, with_budget
from tierwise_sidecar.replay.runner import _compressed, _outage
from tierwise_sidecar.replay.source import load_input
from tierwise_sidecar.replay.trace import TraceError
from tierwise_sidecar.replay.tracegen import TraceMeta, TraceParams, generate, trace_meta

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quickstart() -> Policy:
    return CrFolder(ROOT / "examples" / "quickstart", None, "tierwise-system").load().policy


def _meta(**params: Any) -> TraceMeta:
    params = {"outage_at_s": 10, "outage_len_s": 2, **params}
    p = TraceParams(duration_s=20, seed=3, **params)
    return trace_meta(p, generate(p))


def test_outage_is_the_first_backend_of_the_tier(quickstart: Policy) -> None:
    events = events_of(_meta(outage_at_s=5, outage_len_s=3), quickstart)
    assert events.outage == Outage("gpt-4o", 5, 8)
    silver = events_of(_meta(outage_tier="silver"), quickstart)
    assert silver.outage is not None and silver.outage.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert events_of(_meta(outage_len_s=0), quickstart).outage is None
    assert events_of(_meta(outage_at_s=30), quickstart).outage is None  # after the end
    with pytest.raises(TraceError, match="outage tier 'platinum' is not a tier of the Policy"):
        events_of(_meta(outage_tier="platinum"), quickstart)


def test_budget_takes_the_staged_thresholds_and_stacks(quickstart: Policy) -> None:
    meta = _meta(budget_fraction=0.1)
    events = events_of(meta, quickstart)
    b = events.budget
    assert b is not None and b.tenant == "acme" and b.usd == meta.budget_usd > 0
    # team-monthly has the most steps: Notify 50, Downgrade 80 (to silver), Throttle 95, Reject 100.
    assert [(t.percent, t.action) for t in b.thresholds] == [
        (50, ThresholdAction.NOTIFY), (80, ThresholdAction.DOWNGRADE), (95, ThresholdAction.THROTTLE),
        (100, ThresholdAction.REJECT),
    ]  # fmt: skip
    assert b.thresholds[1].downgrade_to == "silver"
    stacked = with_budget(quickstart, b)
    assert [x.name for x in stacked.budgets] == [*(x.name for x in quickstart.budgets), "trace-acme"]
    added = stacked.budgets[-1]
    assert added.spec.selector.tenants == ["acme"] and added.spec.limit.usd == b.usd
    assert added.spec.period is Period.ROLLING_24_HOURS and added.namespace == quickstart.namespace
    assert stacked.hash != quickstart.hash
    lines = events.describe()
    assert any("gpt-4o answers 503" in line for line in lines)
    assert any("tenant 'acme' may spend" in line and "Downgrade at 80 %" in line for line in lines)


def test_budget_without_policy_budgets_notifies_then_rejects(quickstart: Policy) -> None:
    bare = quickstart.model_copy(update={"budgets": []})
    b = events_of(_meta(), bare).budget
    assert b is not None and b.thresholds == DEFAULT_THRESHOLDS
    assert events_of(_meta(budget_fraction=0.0), bare).budget is None


def test_compressed_clock_scales_throttle_rates(quickstart: Policy) -> None:
    fast = _compressed(quickstart, 10)
    throttle = {b.name: [t.requests_per_second for t in b.spec.thresholds if t.requests_per_second]
                for b in fast.budgets}  # fmt: skip
    assert throttle["team-monthly"] == [10.0]  # 1 request/s on the trace's clock
    assert fast.tiers["gold"].spec.slo.first_token_p95_milliseconds == 80
    assert _compressed(quickstart, 1) is quickstart


def test_outage_fails_the_provider_for_its_window_only() -> None:
    async def run() -> tuple[float, float, float]:
        fake = FakeBackend(FakeConfig(first_byte_ms=1), name="m")
        t0 = time.monotonic()
        task = asyncio.create_task(_outage(fake, Outage("m", 1.0, 2.0), t0, speed=10))
        await asyncio.sleep(0.05)
        before = fake.config.error_rate
        await asyncio.sleep(0.1)  # inside 0.1-0.2 s of wall time
        during = fake.config.error_rate
        assert fake.config == replace(FakeConfig(first_byte_ms=1), error_rate=1.0, error_status=503)
        await task
        return before, during, fake.config.error_rate

    assert asyncio.run(run()) == (0.0, 1.0, 0.0)


def test_meta_path_by_convention(tmp_path: Path) -> None:
    trace = tmp_path / "ref.jsonl"
    assert meta_path(trace, None) is None
    (tmp_path / "ref.meta.json").write_text("{}")
    assert meta_path(trace, None) == tmp_path / "ref.meta.json"
    assert meta_path(trace, tmp_path / "other.json") == tmp_path / "other.json"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 5000 + "]" * 5000, "nested too deeply to be a Policy"),
        ('{"kind": "ConfigMap", "data": {"policy.json": "' + "[" * 5000 + "]" * 5000 + '"}}', "nested too deeply"),
        ('{"kind": "ConfigMap", "data": {"policy.json": "{\\"tiers\\": 3}"}}', "Field required"),
    ],
)
def test_a_policy_input_that_is_not_one_is_refused_by_name(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(PolicyLoadError, match=message):
        load_input(str(path), None, "tierwise-system", io.StringIO())
    with pytest.raises(PolicyLoadError, match=message):
        load_input("-", None, "tierwise-system", io.StringIO(content))
    path.write_bytes(b"\xb2\xff" * 10)
    with pytest.raises(PolicyLoadError, match="not UTF-8"):
        load_input(str(path), None, "tierwise-system", io.StringIO())
