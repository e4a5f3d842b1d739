"""What the sidecar tells operators: a real Prometheus scrapes its counters, and a Policy change
is picked up (or refused) while requests are in flight."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import yaml

from promserver import start_prometheus
from tests.conftest import Net, wait_for
from tests.servers import CHAT, backend, tier

DEFAULT = {"defaultFor": {"names": ["apps"]}}


def test_real_prometheus_scrapes_the_sidecar(net: Net, tmp_path: Path) -> None:
    fake = net.fake()
    gw = net.gateway(
        tier(
            "t",
            [
                backend("cheap", fake.v1, capabilities={"strength": 30}),
                backend("strong", fake.v1, model="gpt-4o", price=(2.5, 10), capabilities={"strength": 90}),
            ],
            access=DEFAULT,
            routing={"strategy": "CostAware"},
        ),
        namespace="apps",
    )
    for i in range(5):
        gw.post("/v1/chat/completions", CHAT, {"x-tierwise-tenant": f"acme-{i % 2}"})
    hard = {
        "model": "x",
        "messages": [
            {"role": "user", "content": "Prove step by step that the integral of 2x is x^2 and explain why; "
             "then design and debug a Python function `def f(x): return x**2` and compare trade-offs."}
        ],
    }  # fmt: skip
    status, headers, _ = gw.post("/v1/chat/completions", hard)
    assert status == 200 and headers["x-tierwise-route"] == "strong" and headers["x-tierwise-backend"] == "strong"
    assert float(headers["x-tierwise-route-score"]) >= 0.7
    gw.post("/v1/chat/completions", b"{broken")

    prom = start_prometheus(tmp_path / "prom", [f"127.0.0.1:{gw.port}"])
    try:
        got = wait_for("requests in Prometheus", lambda: prom.query("sum(tierwise_requests_total)"), timeout=30)
        assert float(got[0]["value"][1]) == 6
        by_tenant = {r["metric"]["tenant"]: float(r["value"][1]) for r in prom.query("tierwise_requests_total")}
        assert by_tenant == {"acme-0": 3, "acme-1": 2, "none": 1}
        cost = prom.query('sum by (backend) (tierwise_cost_usd_total{namespace="apps"})')
        assert {r["metric"]["backend"] for r in cost} == {"cheap", "strong"}
        assert prom.query('tierwise_invalid_requests_total{code="invalid_json"}')[0]["value"][1] == "1"
        assert prom.query("tierwise_tokens_total")
        assert prom.query("tierwise_request_duration_seconds_count")
        decisions = {
            r["metric"]["decision"]: r["metric"]["backend"] for r in prom.query("tierwise_route_decisions_total")
        }
        assert decisions == {"cheap": "cheap", "strong": "strong"}
        scores = prom.query('tierwise_route_score_count{tier="t"}')
        assert float(scores[0]["value"][1]) == 6
    finally:
        prom.stop()


def test_policy_hot_reload_keeps_streams_and_refuses_broken_policies(net: Net) -> None:
    old, new = net.fake("old", per_token_ms=50, completion_tokens=20), net.fake("new")
    gw = net.gateway(tier("t", [backend("b", old.v1)], access=DEFAULT), namespace="apps", reload_interval=0.1)
    folder = gw.gateway.source.path  # type: ignore[attr-defined]
    first_hash = gw.gateway.runtime.policy.hash  # type: ignore[union-attr]

    streamed: list[str] = []

    def stream() -> None:
        for c in gw.client().chat.completions.create(model="x", messages=CHAT["messages"], stream=True):
            streamed.append(c.choices[0].delta.content or "" if c.choices else "")

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for("the stream to start", lambda: len(streamed) > 2, timeout=10, interval=0.02)
    # Swap the backend while the stream is mid-way: the stream finishes on the old Policy.
    (folder / "policy.yaml").write_text(yaml.safe_dump(tier("t", [backend("b", new.v1)], access=DEFAULT)))
    wait_for("the new Policy", lambda: gw.gateway.runtime.policy.hash != first_hash, timeout=10)  # type: ignore[union-attr]
    reader.join(20)
    assert len("".join(streamed).split()) == 20, "the in-flight stream was cut by the reload"
    gw.post("/v1/chat/completions", CHAT)
    assert new.requests == 1 and old.requests == 1

    good_hash = gw.gateway.runtime.policy.hash  # type: ignore[union-attr]

    def refused() -> float:
        found = re.search(r'tierwise_policy_reloads_total\{result="refused"\} (\S+)', gw.get("/metrics")[1].decode())
        return float(found.group(1)) if found else 0.0

    # A file caught half-written may be refused twice (once per state seen): count at least one.
    (folder / "policy.yaml").write_text("kind: InferenceTier\nspec: [this is not, a tier")
    wait_for("invalid YAML to be refused", lambda: refused() >= 1, timeout=10)
    assert gw.gateway.runtime.policy.hash == good_hash  # type: ignore[union-attr]
    before = refused()
    bad_tier = tier("t", [backend("b", new.v1)], access=DEFAULT, fallback={"tier": "missing"})
    (folder / "policy.yaml").write_text(yaml.safe_dump(bad_tier))
    wait_for("a fallback to a missing tier to be refused", lambda: refused() > before, timeout=10)
    assert gw.gateway.runtime.policy.hash == good_hash  # type: ignore[union-attr]
    assert gw.post("/v1/chat/completions", CHAT)[0] == 200
    text = gw.get("/metrics")[1].decode()
    assert f'tierwise_policy_info{{hash="{good_hash}",namespace="apps"}} 1.0' in text
    assert json.loads(gw.get("/readyz")[1])["policy"] == good_hash
