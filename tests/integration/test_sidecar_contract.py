"""What docs/sidecar.md promises and a look from outside found missing: a model name routes to the
tier that serves it, an unknown one is served visibly (or refused where the namespace says so); a
request that fails upstream leaves one log line with no key and no prompt; a backend that cannot
be reached is warned about at load; retries and stream endings are what the docs say."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Net, wait_for
from tests.servers import CHAT, backend, tier
from tierwise_sidecar.secrets import SecretSource

DEFAULT = {"defaultFor": {"names": ["apps"]}}
SECRET = "sk-test-never-logged"


def _tiers(net: Net) -> list[dict[str, object]]:
    fake = net.fake()
    return [
        tier("gold", [backend("g", fake.v1, "gpt-4o", (2.5, 10))], priority=10),
        tier("silver", [backend("s", fake.v1, "gpt-4o-mini")], access=DEFAULT),
        tier("bronze", [backend("b", fake.v1, "gpt-4o-mini", (0.1, 0.4))], priority=-1),
    ]


def test_a_model_name_routes_to_the_tier_that_serves_it(net: Net) -> None:
    gw = net.gateway(*_tiers(net), namespace="apps")
    status, h, _ = gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-4o"})
    assert status == 200 and h["x-tierwise-tier"] == "gold" and "x-tierwise-model-substituted" not in h
    # Served by two tiers: the default tier, when it is one of them.
    status, h, _ = gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"})
    assert status == 200 and h["x-tierwise-tier"] == "silver"


def test_an_unknown_model_is_served_by_the_default_tier_visibly(net: Net) -> None:
    gw = net.gateway(*_tiers(net), namespace="apps")
    status, h, _ = gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-5-ultra"})
    assert status == 200 and h["x-tierwise-tier"] == "silver" and h["x-tierwise-model"] == "gpt-4o-mini"
    assert h["x-tierwise-model-substituted"] == "gpt-5-ultra"
    # A non-ASCII name cannot break the header.
    status, h, _ = gw.post("/v1/chat/completions", {**CHAT, "model": "modèle-é"})
    assert status == 200 and h["x-tierwise-model-substituted"] == "mod%C3%A8le-%C3%A9"
    metrics = gw.get("/metrics")[1].decode()
    assert 'tierwise_model_substitutions_total{namespace="apps",tier="silver"} 2.0' in metrics


def test_a_namespace_can_refuse_unknown_models(net: Net) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "apps", "labels": {"tierwise.dev/unknown-model": "refuse"}}}  # fmt: skip
    gw = net.gateway(*_tiers(net), namespace, namespace="apps")
    status, _, body = gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-5-ultra"})
    assert status == 404 and b'"code": "model_not_found"' in body and b"silver" in body
    assert gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-4o"})[0] == 200
    # A tier named in the header is that tier, whatever the model says.
    assert gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-5-ultra"}, {"x-tierwise-tier": "bronze"})[0] == 200


def test_the_backends_key_from_its_secret_is_what_the_provider_gets(net: Net) -> None:
    """The key goes to the provider (and only to the backend it belongs to); the gateway says who
    calls; a caller's own Authorization never reaches a provider."""
    keyed, open_ = net.fake("keyed"), net.fake("open")
    gw = net.gateway(
        tier("gold", [backend("g", keyed.v1, apiKeySecretRef={"name": "openai", "key": "k"})], access=DEFAULT),
        tier("silver", [backend("s", open_.v1)]),
        namespace="apps",
        secrets=SecretSource(Path("/nonexistent"), {"TIERWISE_SECRET_OPENAI_K": SECRET}),
    )
    caller = {"Authorization": "Bearer caller-own-token"}
    for model, fake in (("gold", keyed), ("silver", open_)):
        assert gw.post("/v1/chat/completions", {**CHAT, "model": model}, caller)[0] == 200
        seen = {k.lower(): v for k, v in fake.backend.stats.last_headers.items()}
        assert seen.get("authorization") == (f"Bearer {SECRET}" if fake is keyed else None), model
        assert seen["user-agent"] == "tierwise-sidecar" and seen["content-type"] == "application/json"


def test_a_request_failing_upstream_leaves_one_line_with_no_key_and_no_prompt(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    dead = net.fake("dead")
    dead.stop_listening()
    tiers = [
        tier("gold", [backend("g", dead.url + "/v1", apiKeySecretRef={"name": "openai", "key": "k"})],
             access=DEFAULT, fallback={"tier": "silver"}),
        tier("silver", [backend("s", dead.url + "/v1")]),
    ]  # fmt: skip
    gw = net.gateway(
        *tiers, namespace="apps", secrets=SecretSource(Path("/nonexistent"), {"TIERWISE_SECRET_OPENAI_K": SECRET})
    )
    prompt = "my private prompt text"
    with caplog.at_level(logging.DEBUG, logger="tierwise"):
        status, _, _ = gw.post(
            "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": prompt}]}
        )
        assert status == 502

        # The line is written on the request's way out, which may end just after the caller has its answer.
        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if "request failed upstream" in r.getMessage()]

        wait_for("the failed request's log line", logged, timeout=10, interval=0.05)
    lines = logged()
    assert len(lines) == 1
    line = lines[0]
    assert "status=502" in line and "tier=gold" in line and "gold/g@127.0.0.1:" in line and "silver/s@" in line
    assert "=ConnectionError" in line
    every = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in every and prompt not in every


def test_a_backend_with_no_endpoint_is_warned_about_at_load(net: Net, caplog: pytest.LogCaptureFixture) -> None:
    fake = net.fake()
    self_hosted = {"name": "llama", "model": "llama-8b", "pricing": {"inputPerMillion": 0.1, "outputPerMillion": 0.1},
                   "deployment": {"image": "vllm/vllm-openai:v0.11.0"}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tierwise"):
        gw = net.gateway(tier("t", [backend("b", fake.v1), self_hosted], access=DEFAULT), namespace="apps")
    warned = [r.getMessage() for r in caplog.records if "no known endpoint" in r.getMessage()]
    assert warned == [
        "backend t/llama has no known endpoint: requests skip it "
        "(self-hosted: no replica found; list it in --endpoints)"
    ]
    assert gw.post("/v1/chat/completions", CHAT)[0] == 200


@pytest.mark.parametrize(("upstream", "answer", "tries"), [(500, 502, 2), (502, 502, 2), (503, 503, 1), (504, 504, 1)])
def test_the_retry_policy_is_the_documented_one(net: Net, upstream: int, answer: int, tries: int) -> None:
    """A 500 or 502 is a blip, retried once on the same target; a 503 (overloaded) and a 504
    (timeout) say the target is busy or slow, and the next target is tried instead."""
    fake = net.fake(error_rate=1.0, error_status=upstream)
    gw = net.gateway(tier("t", [backend("b", fake.v1)], access=DEFAULT), namespace="apps")
    status, h, _ = gw.post("/v1/chat/completions", CHAT)
    assert (status, h["x-tierwise-attempts"], fake.requests) == (answer, str(tries), tries)


def test_a_complete_stream_ends_with_done_and_a_cut_one_with_an_error_event_only(net: Net) -> None:
    fake = net.fake(completion_tokens=8)
    gw = net.gateway(tier("t", [backend("b", fake.v1)], access=DEFAULT), namespace="apps")
    raw = _stream(gw.url)
    assert raw.endswith(b"data: [DONE]\n\n") and b": tierwise cost_usd=" in raw
    fake.configure(drop_after_chunks=3)
    cut = _stream(gw.url)
    assert b"[DONE]" not in cut
    last = cut.strip().split(b"\n\n")[-1]
    assert last.startswith(b'data: {"error"') and b"stream_interrupted" in last


def _stream(url: str) -> bytes:
    body = json.dumps({**CHAT, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return bytes(r.read())


def test_a_cookie_a_provider_sets_never_goes_back_with_anyone_s_request(net: Net) -> None:
    """A provider behind a CDN sets cookies; a client that kept them would send one caller's
    cookie with every other caller's request. The provider is named by host name here: aiohttp's
    default jar keeps no cookie from an IP address, so 127.0.0.1 could not show it."""
    fake = net.fake(set_cookie="__cf_bm=abc123; Path=/; HttpOnly")
    by_name = fake.v1.replace("127.0.0.1", "localhost")
    gw = net.gateway(tier("silver", [backend("s", by_name)], access=DEFAULT), namespace="apps")
    for tenant in ("team-a", "team-b", "team-a"):
        assert gw.post("/v1/chat/completions", CHAT, {"x-tierwise-tenant": tenant})[0] == 200
    assert fake.requests == 3 and fake.backend.stats.with_cookie == 0


def test_a_caller_gone_before_its_stream_starts_is_a_499_billed_for_its_prompt(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that hangs up while the provider is still starting its stream is not an internal
    error: no 500, no traceback; the provider's prompt is still counted."""
    fake = net.fake(first_byte_ms=400)
    gw = net.gateway(tier("silver", [backend("s", fake.v1)], access=DEFAULT), namespace="apps")
    body = json.dumps({**CHAT, "stream": True}).encode()
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        time.sleep(0.1)  # the gateway is waiting for the provider's first byte
    responses = 'tierwise_http_responses_total{code="499",endpoint="/v1/chat/completions"} 1.0'
    wait_for("the hang-up counted", lambda: responses in gw.get("/metrics")[1].decode(), timeout=10)
    metrics = gw.get("/metrics")[1].decode()
    assert 'code="500"' not in metrics
    assert "tierwise_tokens_total{" in metrics and 'kind="input"' in metrics, "the prompt is billed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
