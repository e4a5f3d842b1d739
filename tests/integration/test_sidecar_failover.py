"""Failures of providers: fallback tiers, timeouts from the SLO, resets, circuit breakers, and
streams cut half-way. The caller sees an answer, or a clear error; never a hang."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.conftest import Net
from tests.servers import CHAT, backend, tier
from tierwise_sidecar.forward import ForwardConfig

DEFAULT = {"defaultFor": {"names": ["apps"]}}


def _gold_silver(net: Net, gold_slo: dict[str, int] | None = None, **gold_fake: object):  # type: ignore[no-untyped-def]
    gold, silver = net.fake("gold", **gold_fake), net.fake("silver")
    gw = net.gateway(
        tier(
            "gold",
            [backend("g", gold.v1, model="gpt-4o")],
            access=DEFAULT,
            fallback={"tier": "silver"},
            slo=gold_slo or {},
        ),
        tier("silver", [backend("s", silver.v1)]),
        namespace="apps",
        forward=ForwardConfig(backoff_base=0.001),
        breaker_cooldown=1.0,
    )
    return gold, silver, gw


def test_fallback_on_server_error(net: Net) -> None:
    gold, silver, gw = _gold_silver(net, error_rate=1.0, error_status=500)
    status, headers, body = gw.post("/v1/chat/completions", CHAT)
    assert status == 200, body
    assert headers["x-tierwise-tier"] == "silver" and headers["x-tierwise-fallback-from"] == "gold"
    # A 5xx is retried once on the same target (jittered backoff) before falling back.
    assert gold.requests == 2 and silver.requests == 1
    assert headers["x-tierwise-attempts"] == "3"


def test_fallback_on_connection_reset(net: Net) -> None:
    gold, silver, gw = _gold_silver(net, reset_rate=1.0)
    reply = gw.client().chat.completions.create(model="x", messages=CHAT["messages"])
    assert reply.model == "gpt-4o-mini" and silver.requests == 1 and gold.backend.stats.resets >= 1


def test_fallback_on_first_byte_timeout_from_the_slo(net: Net) -> None:
    # gold promises a first token within 300 ms at p99; a provider slower than that is abandoned.
    _, silver, gw = _gold_silver(net, {"firstTokenP99Milliseconds": 300}, first_byte_ms=5000)
    started = time.monotonic()
    chunks = list(gw.client().chat.completions.create(model="x", messages=CHAT["messages"], stream=True))
    assert time.monotonic() - started < 5, "waited for the slow provider instead of falling back"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) and silver.requests == 1


def test_client_errors_are_passed_through_not_failed_over(net: Net) -> None:
    gold, silver, gw = _gold_silver(net, error_rate=1.0, error_status=422)
    status, _, body = gw.post("/v1/chat/completions", CHAT)
    assert status == 422 and json.loads(body)["error"]["code"] == "fake_error"
    assert gold.requests == 1 and silver.requests == 0


def test_every_fallback_failing_gives_502_and_rate_limits_429(net: Net) -> None:
    gold, silver, gw = _gold_silver(net, error_rate=1.0)
    silver.configure(error_rate=1.0)
    with pytest.raises(openai.InternalServerError) as e:
        gw.client().chat.completions.create(model="x", messages=CHAT["messages"])
    assert e.value.status_code == 502 and e.value.code == "upstream_failed"
    # 429 from the last provider: the caller gets 429 and Retry-After, the SDK's RateLimitError.
    silver.configure(error_rate=1.0, error_status=429)
    gold.configure(error_rate=0.0, capacity=0)
    with pytest.raises(openai.RateLimitError) as rl:
        gw.client().chat.completions.create(model="x", messages=CHAT["messages"])
    assert rl.value.response.headers["retry-after"]


def test_no_request_outlives_the_tiers_total_timeout(net: Net) -> None:
    slow = net.fake("slow", first_byte_ms=20_000)
    gw = net.gateway(
        tier("t", [backend("b", slow.v1)], access=DEFAULT, slo={"totalP99Milliseconds": 1000}), namespace="apps"
    )
    started = time.monotonic()
    status, _, body = gw.post("/v1/chat/completions", CHAT)
    elapsed = time.monotonic() - started
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert 0.4 <= elapsed < 5, f"took {elapsed:.1f}s against a 1 s deadline"
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        list(gw.client().chat.completions.create(model="x", messages=CHAT["messages"], stream=True))
    assert e.value.status_code == 504 and time.monotonic() - started < 5


def test_circuit_breaker_opens_and_recovers(net: Net) -> None:
    gold, _, gw = _gold_silver(net, error_rate=1.0)
    for _ in range(5):
        assert gw.post("/v1/chat/completions", CHAT)[0] == 200
    # Five requests x two tries opened gold's breaker: requests now skip it without trying.
    tried = gold.requests
    status, headers, _ = gw.post("/v1/chat/completions", CHAT)
    assert status == 200 and headers["x-tierwise-tier"] == "silver" and gold.requests == tried
    _, metrics = gw.get("/metrics")
    assert 'tierwise_circuit_open_targets{backend="g",tier="gold"} 1.0' in metrics.decode()
    # Healed: after the cooldown one probe goes through, succeeds, and gold serves again.
    gold.configure(error_rate=0.0)
    time.sleep(1.1)
    status, headers, _ = gw.post("/v1/chat/completions", CHAT)
    assert headers["x-tierwise-tier"] == "gold" and gold.requests == tried + 1
    assert gw.post("/v1/chat/completions", CHAT)[1]["x-tierwise-tier"] == "gold"


def test_mid_stream_drop_resumes_on_the_fallback(net: Net) -> None:
    gold, silver, gw = _gold_silver(net, drop_after_chunks=4, completion_tokens=12)
    chunks = list(gw.client().chat.completions.create(model="x", messages=CHAT["messages"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The four words gold sent, then silver's continuation: nothing lost, nothing repeated.
    gold_words = gold.backend._reply(json.dumps(CHAT["messages"][-1:]), 12)[:4]
    assert text.startswith("".join(gold_words)) and len(text) > len("".join(gold_words))
    assert gold.backend.stats.drops == 1 and silver.requests == 1
    resumed = silver.backend.stats.models
    assert resumed == {"gpt-4o-mini": 1}
    _, metrics = gw.get("/metrics")
    assert 'tierwise_stream_interruptions_total{outcome="resumed",tier="gold"} 1.0' in metrics.decode()


def test_mid_stream_drop_without_fallback_ends_with_an_error_event(net: Net) -> None:
    only = net.fake("only", drop_after_chunks=3)
    gw = net.gateway(tier("t", [backend("b", only.v1)], access=DEFAULT), namespace="apps")
    received = []
    with pytest.raises(openai.APIError) as e:
        for chunk in gw.client().chat.completions.create(model="x", messages=CHAT["messages"], stream=True):
            received.append(chunk)
    assert "stream interrupted" in e.value.message
    assert len([c for c in received if c.choices and c.choices[0].delta.content]) == 3
