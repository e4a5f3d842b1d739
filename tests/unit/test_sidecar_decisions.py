"""The sidecar's decisions are pure functions: tested here without any I/O."""

from __future__ import annotations

import asyncio
import random

import pytest

from tierwise.api.tier import SLO, InferenceTierSpec
from tierwise_sidecar.account import segment
from tierwise_sidecar.breaker import Breaker, State
from tierwise_sidecar.difficulty import chat_difficulty
from tierwise_sidecar.endpoints import parse_endpoints, resolve
from tierwise_sidecar.errors import ApiError
from tierwise_sidecar.identify import Priority, TierAccess, identify
from tierwise_sidecar.route import (
    CHEAP,
    LEAST_LOADED,
    PINNED,
    STRONG,
    WEIGHTED,
    order_backends,
    order_endpoints,
    pin_first,
)
from tierwise_sidecar.runtime import TierRoute, timeouts_for
from tierwise_sidecar.secrets import SecretSource
from tierwise_sidecar.sse import Relay, StreamState
from tierwise_sidecar.sticky import rendezvous


def _tier(strategy: str = "CostAware", **spec: object) -> TierRoute:
    backends = [
        {"name": "small", "model": "m-small", "url": "http://a/v1", "weight": 1,
         "pricing": {"inputPerMillion": 0.1, "outputPerMillion": 0.4}, "capabilities": {"strength": 30}},
        {"name": "large", "model": "m-large", "url": "http://b/v1", "weight": 3,
         "pricing": {"inputPerMillion": 3, "outputPerMillion": 15}, "capabilities": {"strength": 95}},
        {"name": "mid", "model": "m-mid", "url": "http://c/v1", "weight": 0,
         "pricing": {"inputPerMillion": 0.5, "outputPerMillion": 1.5}, "capabilities": {"strength": 60}},
    ]  # fmt: skip
    spec = {"backends": backends, "routing": {"strategy": strategy}, **spec}
    return TierRoute.of("t", InferenceTierSpec.model_validate(spec), [], SecretSource(environ={}))


def names(decision) -> list[str]:  # type: ignore[no-untyped-def]
    return [b.name for b in decision.order]


def test_cost_aware_thresholds() -> None:
    t = _tier()
    rng = random.Random(1)
    cheap = order_backends(t, 0.1, {}, lambda b: True, rng)
    assert cheap.decision == CHEAP and names(cheap) == ["small", "mid", "large"]
    strong = order_backends(t, 0.9, {}, lambda b: True, rng)
    assert strong.decision == STRONG and names(strong) == ["large", "mid", "small"]
    middle = order_backends(t, 0.5, {}, lambda b: True, rng)
    assert middle.decision == WEIGHTED and middle.score == 0.5
    # Unusable backends (open breakers, too small a context) are left out.
    assert names(order_backends(t, 0.9, {}, lambda b: b.name != "large", rng)) == ["mid", "small"]


def test_weighted_follows_weights_and_least_loaded_follows_load() -> None:
    t = _tier("Weighted")
    rng = random.Random(7)
    firsts = [order_backends(t, None, {}, lambda b: True, rng).order[0].name for _ in range(4000)]
    assert firsts.count("mid") == 0  # weight 0 is never first
    assert 0.70 < firsts.count("large") / 4000 < 0.80  # 3 of 4
    ll = order_backends(_tier("LeastLoaded"), None, {"t/small": 5, "t/large": 3}, lambda b: True, rng)
    # small: 5/1, large: 3/3, mid: 0/max(0,1)
    assert ll.decision == LEAST_LOADED and names(ll) == ["mid", "large", "small"]


def test_pinned_backend_goes_first() -> None:
    d = order_backends(_tier(), 0.9, {}, lambda b: True, random.Random(0))
    pinned = pin_first(d, "small")
    assert pinned.decision == PINNED and names(pinned) == ["small", "large", "mid"]
    assert pin_first(d, "gone") is d


def test_rendezvous_is_stable_and_moves_only_the_lost_endpoints_sessions() -> None:
    endpoints = [f"http://10.0.0.{i}:8000/v1" for i in range(5)]
    before = {f"s{i}": rendezvous(f"s{i}", endpoints)[0] for i in range(1000)}
    assert len(set(before.values())) == 5
    survivors = endpoints[:2] + endpoints[3:]
    after = {s: rendezvous(s, survivors)[0] for s in before}
    moved = {s for s in before if before[s] != after[s]}
    assert moved == {s for s in before if before[s] == endpoints[2]}
    assert order_endpoints(endpoints, "s1", 0, pinned=endpoints[4])[0] == endpoints[4]
    assert order_endpoints(endpoints, None, 7) == endpoints[2:] + endpoints[:2]


def test_breaker_opens_half_opens_and_closes() -> None:
    b = Breaker(threshold=3, cooldown=10)
    for _ in range(2):
        assert b.acquire(0)
        b.failure(0)
    assert b.state is State.CLOSED
    b.failure(1)
    assert b.state is State.OPEN and not b.acquire(5) and not b.available(5)
    assert b.available(11) and b.acquire(11) and b.state is State.HALF_OPEN
    assert not b.acquire(11)  # one probe at a time
    b.failure(12)
    assert b.state is State.OPEN and not b.acquire(15)
    assert b.acquire(22)
    b.success()
    assert b.state is State.CLOSED and b.acquire(22) and b.acquire(22)


def test_timeouts_follow_the_slo() -> None:
    t = timeouts_for(SLO(first_token_p99_milliseconds=800, total_p99_milliseconds=20_000))
    assert (t.first_byte, t.total, t.attempt) == (0.8, 20.0, 10.0) and t.connect == 0.8
    t = timeouts_for(SLO(total_p95_milliseconds=3000, total_p99_milliseconds=6000))
    assert (t.first_byte, t.attempt, t.total) == (6.0, 6.0, 6.0)
    t = timeouts_for(SLO())
    assert (t.connect, t.first_byte, t.total) == (3.0, 30.0, 300.0)


def test_difficulty_features_and_priority() -> None:
    easy = chat_difficulty([{"role": "user", "content": "Say hello"}], 10, Priority.NORMAL)
    hard = chat_difficulty(
        [{"role": "user", "content": "Prove step by step why the integral of 2x is x^2, then debug `def f(x):`"}],
        40,
        Priority.NORMAL,
    )
    assert easy.score < 0.35 and hard.score >= 0.7 and hard.code == hard.math == 1
    assert chat_difficulty([{"role": "user", "content": "Say hello"}], 10, Priority.HIGH).score > easy.score
    deep = [{"role": r, "content": "ok"} for r in ["user", "assistant"] * 9]
    assert chat_difficulty(deep, 50, Priority.NORMAL).depth == 1.0


def test_identify_limits_tiers_to_the_namespace() -> None:
    access = TierAccess("apps", {"gold", "bronze"}, {"platinum"}, "bronze")
    got = identify({"x-tierwise-tenant": "acme", "x-tierwise-priority": "High"}, {"user": "u1"}, access)
    assert (got.tier, got.tenant, got.priority, got.session) == ("bronze", "acme", Priority.HIGH, "u1")
    assert identify({"x-tierwise-session": "s"}, {"model": "gold", "user": "u"}, access).session == "s"
    assert identify({}, {"model": "gold"}, access).tier == "gold"
    refused = [
        ({"x-tierwise-tier": "platinum"}, 403),
        ({"x-tierwise-tier": "x"}, 404),
        ({"x-tierwise-tenant": "has space"}, 400),
        ({"x-tierwise-priority": "9"}, 400),
    ]
    for headers, status in refused:
        with pytest.raises(ApiError) as e:
            identify(headers, {}, access)
        assert e.value.status == status


def test_sse_relay_splits_events_across_chunks_and_strips_unasked_usage() -> None:
    state = StreamState(chat=True, strip_usage=True)
    relay = Relay(state)
    events = (
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    out = b"".join(relay.feed(events[i : i + 7]) for i in range(0, len(events), 7))
    assert out == events.split(b'data: {"choices":[],"usage"')[0]
    assert state.text == ["Hel", "lo"] and state.finish_reason == "stop" and state.done and state.complete
    assert state.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    cut = StreamState(chat=True, strip_usage=False)
    Relay(cut).feed(b'data: {"choices":[{"delta":{"content":"Hel"}}]}\r\n\r\ndata: {"choi')
    assert cut.text == ["Hel"] and not cut.complete


def test_segment_prices_usage_or_counts() -> None:
    t = _tier()
    large = next(b for b in t.backends if b.name == "large")
    s = segment(
        large, {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 400}}, 0, 0
    )
    assert s.usd == pytest.approx((600 * 3 + 400 * 3 + 100 * 15) / 1e6)  # no cached price: input price
    assert segment(large, None, 10, 20).usd == pytest.approx((10 * 3 + 20 * 15) / 1e6)


def test_endpoints_file_and_dns_resolution() -> None:
    assert parse_endpoints({"t/b": ["http://10.0.0.1:8000/v1/"]}, "f") == {"t/b": ("http://10.0.0.1:8000/v1",)}
    for bad in ({"tb": ["http://x"]}, {"t/b": "http://x"}, {"t/b": ["ftp://x"]}, ["t/b"]):
        with pytest.raises(ValueError):
            parse_endpoints(bad, "f")
    assert "http://127.0.0.1:8000/v1" in asyncio.run(resolve("localhost", 8000))


def test_sse_relay_flags_tool_calls_and_survives_odd_shapes() -> None:
    state = StreamState(chat=True, strip_usage=False)
    relay = Relay(state)
    relay.feed(b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]}}]}\n\n')
    assert state.tool_calls
    odd = StreamState(chat=True, strip_usage=True)
    events = (
        b'data: {"choices":{"a":1}}\n\ndata: {"choices":[1,{"delta":"x"}],"usage":[1]}\n\ndata: [1]\n\ndata: nope\n\n'
    )
    assert Relay(odd).feed(events) == events
    assert odd.text == [] and odd.usage is None
