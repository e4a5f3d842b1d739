"""Budgets enforced by the gateway, end to end with the openai SDK and fake providers: the
threshold walk on a clock the test moves (Notify, Downgrade to a cheaper tier, Reject, a new
period in a non-UTC zone across a DST change), per-request maximums, dry runs, a platform and a
team budget stacked, tenant budgets, streams billed for what they produced, and the metrics."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest
import yaml

from tests.conftest import Net
from tests.servers import CHAT, backend, tier

DEFAULT = {"defaultFor": {"names": ["apps"]}}
NY = ZoneInfo("America/New_York")
GOLD_PRICE = (100.0, 400.0)  # per million tokens: a 10-token prompt and 16 tokens out cost $0.0074
SILVER_PRICE = (10.0, 40.0)


class Clock:
    """Wall-clock time the test moves."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def set(self, t: float) -> None:
        with self.lock:
            self.now = t


def budget(name: str, namespace: str = "apps", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "CostBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def tiers(net: Net, **fake: Any) -> tuple[list[dict[str, Any]], Any, Any]:
    gold_fake, silver_fake = net.fake("gold", **fake), net.fake("silver", **fake)
    objs = [
        tier("gold", [backend("g", gold_fake.v1, "gpt-4o", GOLD_PRICE)], access=DEFAULT),
        tier("silver", [backend("s", silver_fake.v1, "gpt-4o-mini", SILVER_PRICE)]),
    ]
    return objs, gold_fake, silver_fake


ASK = {**CHAT, "max_tokens": 16}


def test_the_threshold_walk_and_a_new_period_across_a_dst_change(net: Net) -> None:
    # 2026-11-01 is 25 hours long in New York (clocks go back at 02:00): at 00:30 the day has 24.5
    # hours left, not the 23.5 a wall clock shows.
    clock = Clock(datetime(2026, 11, 1, 0, 30, tzinfo=NY).timestamp())
    objs, gold, silver = tiers(net, completion_tokens=16)
    thresholds = [
        {"percent": 30, "action": "Notify"},
        {"percent": 60, "action": "Downgrade", "downgradeTo": "silver"},
        {"percent": 100, "action": "Reject"},
    ]
    gw = net.gateway(
        *objs,
        budget("daily", period="Daily", timeZone="America/New_York", limit={"usd": 0.05}, thresholds=thresholds),
        namespace="apps",
        clock=clock,
    )
    seen: list[tuple[int, str, str, str | None]] = []
    for _ in range(40):
        status, h, body = gw.post("/v1/chat/completions", ASK)
        state = h.get("x-tierwise-budget-state", "")
        seen.append((status, h.get("x-tierwise-tier", ""), state, h.get("x-tierwise-downgraded-from")))
        if status == 429:
            refusal = body
            retry_after = int(h["Retry-After"])
            break
    else:
        pytest.fail(f"the budget never refused: {seen}")
    # The state each answer reports is the budget's once that request's worst case is held.
    states = [s for st, _, s, _ in seen if st == 200]
    order = ["apps/daily=Ok", "apps/daily=Warning", "apps/daily=Downgraded"]
    assert [s for s in order if s in states] == order, seen
    assert states == sorted(states, key=order.index), "states only move forward"
    # Once past the Downgrade threshold, the cheaper tier answers, and says so; never before.
    tiers_served = [t for st, t, _, _ in seen if st == 200]
    downgraded = [t for st, t, _, frm in seen if st == 200 and frm == "gold"]
    assert downgraded and set(downgraded) == {"silver"}
    assert tiers_served == ["gold"] * (len(tiers_served) - len(downgraded)) + downgraded
    assert silver.requests == len(downgraded) and gold.requests == len(seen) - 1 - len(downgraded)
    assert b'"code": "budget_exceeded"' in refusal and b"apps/daily" in refusal
    midnight = datetime(2026, 11, 2, 0, 0, tzinfo=NY).timestamp()
    assert retry_after == int(midnight - clock()) == 24 * 3600 + 1800
    # The refusal held nothing and called nobody.
    assert silver.requests + gold.requests == len(seen) - 1

    clock.set(midnight + 1)
    status, h, _ = gw.post("/v1/chat/completions", ASK)
    assert status == 200 and h["x-tierwise-tier"] == "gold" and h["x-tierwise-budget-state"] == "apps/daily=Ok"


def test_the_notice_and_downgrade_headers(net: Net) -> None:
    objs, _, _ = tiers(net, completion_tokens=16)
    gw = net.gateway(
        *objs,
        budget("m", limit={"usd": 0.01}, thresholds=[
            {"percent": 1, "action": "Notify"}, {"percent": 2, "action": "Downgrade", "downgradeTo": "silver"},
        ]),
        namespace="apps",
    )  # fmt: skip
    gw.post("/v1/chat/completions", ASK)
    status, h, _ = gw.post("/v1/chat/completions", ASK)
    assert status == 200
    assert h["x-tierwise-budget-notice"] == "apps/m passed 1%"
    assert h["x-tierwise-downgraded-from"] == "gold" and h["x-tierwise-tier"] == "silver"
    assert float(h["x-tierwise-budget-remaining-usd"].split("=")[1]) < 0.01


def test_per_request_max_refuses_before_any_call_and_says_a_retry_will_not_help(net: Net) -> None:
    objs, gold, _ = tiers(net)
    gw = net.gateway(*objs, budget("m", limit={"usd": 10}, perRequestMax={"usd": 0.01}), namespace="apps")
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gold", messages=CHAT["messages"], max_tokens=100_000)
    assert e.value.code == "request_over_budget" and "retry will not help" in e.value.message
    assert "apps/m" in e.value.message and gold.requests == 0
    ok = client.chat.completions.create(model="gold", messages=CHAT["messages"], max_tokens=16)
    assert ok.choices[0].message.content


def test_the_sdk_raises_its_rate_limit_error_with_the_budget_code(net: Net) -> None:
    objs, _, _ = tiers(net, completion_tokens=16)
    gw = net.gateway(*objs, budget("tiny", limit={"usd": 0.01}), namespace="apps")
    client = gw.client()
    client.chat.completions.create(model="gold", messages=CHAT["messages"], max_tokens=16)  # $0.0074 of $0.01
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gold", messages=CHAT["messages"], max_tokens=16)
    assert e.value.code == "budget_exceeded" and "apps/tiny" in e.value.message
    assert e.value.response.headers["x-tierwise-budget-reset"].endswith("Z")
    assert int(e.value.response.headers["retry-after"]) > 0


def test_a_dry_run_budget_counts_and_reports_but_never_acts(net: Net) -> None:
    objs, gold, _ = tiers(net, completion_tokens=16)
    gw = net.gateway(
        *objs,
        budget("trial", limit={"usd": 0.001}, dryRun=True,
               thresholds=[{"percent": 1, "action": "Downgrade", "downgradeTo": "silver"},
                           {"percent": 100, "action": "Reject"}]),
        namespace="apps",
    )  # fmt: skip
    for _ in range(3):
        status, h, _ = gw.post("/v1/chat/completions", ASK)
        assert status == 200 and h["x-tierwise-tier"] == "gold"
    assert "apps/trial (dry run) would refuse" in h["x-tierwise-budget-notice"]
    assert "would downgrade gold to silver" in h["x-tierwise-budget-notice"]
    assert gold.requests == 3
    metrics = gw.get("/metrics")[1].decode()
    assert 'tierwise_budget_actions_total{action="dry_run_refusal",budget="trial",budget_namespace="apps"}' in metrics
    spent = _sample(metrics, "tierwise_budget_spent_usd", budget="trial")
    assert spent > 0.02  # counted although never enforced


def test_a_platform_budget_and_a_team_budget_stack(net: Net) -> None:
    objs, _, _ = tiers(net, completion_tokens=16)
    platform = budget("all-teams", "tierwise-system", limit={"usd": 0.02}, selector={"namespaces": {"names": ["apps"]}})
    gw = net.gateway(*objs, platform, budget("team", limit={"usd": 1.0}), namespace="apps")
    status, h, _ = gw.post("/v1/chat/completions", ASK)
    assert status == 200
    counted = dict(kv.split("=") for kv in h["x-tierwise-budget-remaining-usd"].split(", "))
    assert set(counted) == {"apps/team", "tierwise-system/all-teams"}
    for _ in range(10):
        status, h, body = gw.post("/v1/chat/completions", ASK)
        if status == 429:
            break
    assert status == 429 and b"tierwise-system/all-teams" in body
    # The team's own budget was charged for every request served, no more.
    metrics = gw.get("/metrics")[1].decode()
    team = _sample(metrics, "tierwise_budget_spent_usd", budget="team")
    platform_spent = _sample(metrics, "tierwise_budget_spent_usd", budget="all-teams")
    assert team == pytest.approx(platform_spent) and 0.01 < team <= 0.02


def test_a_tenant_budget_touches_no_other_tenant(net: Net) -> None:
    objs, _, _ = tiers(net, completion_tokens=16)
    gw = net.gateway(*objs, budget("acme", limit={"usd": 0.01}, selector={"tenants": ["acme"]}), namespace="apps")
    acme = {"x-tierwise-tenant": "acme"}
    statuses = [gw.post("/v1/chat/completions", ASK, acme)[0] for _ in range(4)]
    assert statuses[0] == 200 and statuses[-1] == 429
    status, h, _ = gw.post("/v1/chat/completions", ASK, {"x-tierwise-tenant": "globex"})
    assert status == 200 and "x-tierwise-budget-state" not in h
    status, h, _ = gw.post("/v1/chat/completions", ASK)
    assert status == 200 and "x-tierwise-budget-state" not in h


def test_a_stream_is_billed_for_what_it_produced_also_when_the_caller_hangs_up(net: Net) -> None:
    objs, gold, _ = tiers(net, completion_tokens=40, per_token_ms=20)
    gw = net.gateway(*objs, budget("m", limit={"usd": 1.0}), namespace="apps")
    client = gw.client()
    stream = client.chat.completions.create(model="gold", messages=CHAT["messages"], max_tokens=40, stream=True)
    worst = float(stream.response.headers["x-tierwise-estimated-cost-usd"])
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 5:
                break
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = gw.get("/metrics")[1].decode()
        held = _sample(metrics, "tierwise_budget_reserved_usd", budget="m")
        spent = _sample(metrics, "tierwise_budget_spent_usd", budget="m")
        if held == 0 and spent > 0:
            break
        time.sleep(0.05)
    # Billed for the prompt and what was produced until the hang-up: more than 5 tokens' worth, less
    # than the 40 tokens the worst case held.
    assert held == 0 and 5 * GOLD_PRICE[1] / 1e6 < spent < worst
    assert 'code="499"' in metrics and gold.requests == 1


def _sample(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in the metrics")


def test_a_throttle_threshold_limits_the_budgets_traffic(net: Net) -> None:
    clock = Clock(datetime(2026, 12, 3, 12, 0, tzinfo=NY).timestamp())
    objs, _, _ = tiers(net, completion_tokens=16)
    thresholds = [{"percent": 1, "action": "Throttle", "requestsPerSecond": 0.5}, {"percent": 100, "action": "Reject"}]
    gw = net.gateway(*objs, budget("slow", limit={"usd": 1.0}, thresholds=thresholds), namespace="apps", clock=clock)
    # $0.0074 a request: the first two start below 1% of $1; the third is past it, and takes the
    # bucket's one request (0.5 per second, at least one); the fourth must wait 2 seconds.
    for _ in range(3):
        assert gw.post("/v1/chat/completions", ASK)[0] == 200
    status, h, body = gw.post("/v1/chat/completions", ASK)
    assert status == 429 and b'"code": "budget_throttled"' in body and h["Retry-After"] == "2"
    clock.set(clock() + 2)
    status, h, _ = gw.post("/v1/chat/completions", ASK)
    assert status == 200 and h["x-tierwise-budget-state"] == "apps/slow=Throttled"
    metrics = gw.get("/metrics")[1].decode()
    assert 'tierwise_budget_refusals_total{budget="slow",budget_namespace="apps",reason="throttle"} 1.0' in metrics


def test_a_refusal_only_holds_are_in_the_way_of_says_retry_soon(net: Net) -> None:
    objs, _, _ = tiers(net, completion_tokens=16, first_byte_ms=1500)
    gw = net.gateway(*objs, budget("small", limit={"usd": 0.02}), namespace="apps")
    results: list[int] = []
    callers = [threading.Thread(target=lambda: results.append(gw.post("/v1/chat/completions", ASK)[0]))
               for _ in range(2)]  # fmt: skip
    for c in callers:
        c.start()
    time.sleep(0.5)  # both hold $0.0074 now; their provider has not answered
    status, h, body = gw.post("/v1/chat/completions", ASK)
    assert status == 429 and h["Retry-After"] == "1" and b"requests in flight settle" in body
    for c in callers:
        c.join(10)
    assert results == [200, 200]
    # Spent now, not held: this one waits for the month to end.
    status, h, body = gw.post("/v1/chat/completions", ASK)
    assert status == 429 and int(h["Retry-After"]) > 3600 and b"the period resets" in body


def test_a_budget_removed_by_a_reload_is_no_longer_enforced_or_reported(net: Net) -> None:
    objs, _, _ = tiers(net, completion_tokens=16)
    gw = net.gateway(*objs, budget("gone", limit={"usd": 0.0001}), namespace="apps")
    assert gw.post("/v1/chat/completions", ASK)[0] == 400  # more than the whole budget
    assert "tierwise_budget_limit_usd{" in gw.get("/metrics")[1].decode()
    folder = gw.gateway.source.path  # type: ignore[attr-defined]
    (folder / "policy.yaml").write_text(yaml.safe_dump_all(objs))
    assert gw.gateway.reload()
    status, h, _ = gw.post("/v1/chat/completions", ASK)
    assert status == 200 and "x-tierwise-budget-state" not in h
    assert "tierwise_budget_limit_usd{" not in gw.get("/metrics")[1].decode()


def test_a_fallback_to_a_costlier_tier_holds_more_or_is_not_tried(net: Net) -> None:
    """The hold covers the tier asked for; falling back to a costlier one first holds the
    difference, and when the budget cannot take it that tier is not called."""
    cheap_fake, gold_fake = net.fake("cheap", error_rate=1.0, error_status=500), net.fake("gold", completion_tokens=16)

    def gateway(limit: float):  # type: ignore[no-untyped-def]
        return net.gateway(
            tier("cheap", [backend("c", cheap_fake.v1, "gpt-4o-mini", SILVER_PRICE)], access=DEFAULT,
                 fallback={"tier": "gold"}),
            tier("gold", [backend("g", gold_fake.v1, "gpt-4o", GOLD_PRICE)]),
            budget("b", limit={"usd": limit}),
            namespace="apps",
        )  # fmt: skip

    # $0.00074 at most on the cheap tier, $0.0074 on gold: a $0.005 budget takes the one only.
    status, _, body = gateway(0.005).post("/v1/chat/completions", {**ASK, "model": "cheap"})
    assert status == 502 and b"over the budget left" in body, body
    assert gold_fake.requests == 0
    gw = gateway(1.0)
    status, h, body = gw.post("/v1/chat/completions", {**ASK, "model": "cheap"})
    assert status == 200 and h["x-tierwise-tier"] == "gold", body
    assert gold_fake.requests == 1
    metrics = gw.get("/metrics")[1].decode()
    labels = '{budget="b",budget_namespace="apps"}'
    assert f"tierwise_budget_reserved_usd{labels} 0.0" in metrics, "both holds released"
    spent = next(
        float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith(f"tierwise_budget_spent_usd{labels}")
    )
    assert spent > 0.00074, "gold's cost counted, above anything the cheap tier could have cost"
