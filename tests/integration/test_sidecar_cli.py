"""The commands as users run them: `tierwise gateway`, `tierwise sidecar` on the Policy file the
operator mounts, graceful shutdown on SIGTERM, and `tierwise estimate`."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from localcluster import free_port
from tests.conftest import TIERWISE, Launch, Net, wait_for
from tests.servers import CHAT, backend, tier
from tierwise_sidecar.tokens import TokenCounter

DEFAULT = {"defaultFor": {"names": ["apps"]}}


def test_gateway_drains_in_flight_streams_on_sigterm(net: Net, tmp_path: Path, launch: Launch) -> None:
    fake = net.fake("slow", per_token_ms=100, completion_tokens=15)
    (tmp_path / "tiers.yaml").write_text(yaml.safe_dump(tier("t", [backend("b", fake.v1)], access=DEFAULT)))
    proc, url = launch("gateway", "--policy", str(tmp_path / "tiers.yaml"), "--drain-seconds", "20")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    words: list[str] = []

    def stream() -> None:
        for c in client.chat.completions.create(model="x", messages=CHAT["messages"], stream=True):
            words.append(c.choices[0].delta.content or "" if c.choices else "")

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for("the stream to start", lambda: len(words) > 2, timeout=10, interval=0.02)
    proc.send_signal(signal.SIGTERM)
    # Not ready any more (a load balancer stops sending), but the stream goes on to its end.
    reader.join(30)
    assert len("".join(words).split()) == 15
    assert proc.wait(30) == 0
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="x", messages=CHAT["messages"])


def test_sidecar_serves_the_compiled_policy_file_and_refuses_a_tampered_one(
    net: Net, tmp_path: Path, launch: Launch
) -> None:
    fake = net.fake()
    crs = tmp_path / "crs.yaml"
    crs.write_text(yaml.safe_dump(tier("t", [backend("b", fake.v1)], access=DEFAULT)))
    compiled = subprocess.run([*TIERWISE, "compile", str(crs), "-o", "json"], capture_output=True, check=True)
    policy_file = tmp_path / "policy.json"
    policy_file.write_bytes(compiled.stdout)
    _, url = launch("sidecar", "--policy-file", str(policy_file), "--reload-interval", "0.2")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.chat.completions.create(model="x", messages=CHAT["messages"]).choices

    policy = json.loads(compiled.stdout)
    policy["tiers"]["t"]["spec"]["backends"][0]["url"] = "http://127.0.0.1:1/v1"  # content changed, hash not
    policy_file.write_text(json.dumps(policy))

    def refused() -> bool:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            return 'tierwise_policy_reloads_total{result="refused"}' in r.read().decode()

    wait_for("the tampered Policy to be refused", refused, timeout=10)
    assert client.chat.completions.create(model="x", messages=CHAT["messages"]).choices


def test_the_health_port_serves_probes_and_metrics_but_not_the_api(net: Net, tmp_path: Path, launch: Launch) -> None:
    """The injected sidecar's API is on loopback; kubelet and Prometheus reach --health-port."""
    fake = net.fake()
    (tmp_path / "tiers.yaml").write_text(yaml.safe_dump(tier("t", [backend("b", fake.v1)], access=DEFAULT)))
    health = free_port()
    _, url = launch("gateway", "--policy", str(tmp_path / "tiers.yaml"), "--health-port", str(health))
    openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).models.list()
    side = f"http://127.0.0.1:{health}"
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(side + path, timeout=5) as r:
            assert r.status == 200
    with urllib.request.urlopen(side + "/metrics", timeout=5) as r:
        assert "tierwise_requests_total" in r.read().decode()
    for path in ("/v1/models", "/v1/chat/completions"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(side + path, timeout=5)
        assert e.value.code in (404, 405)


def test_estimate_prints_tokens_cost_and_route(tmp_path: Path) -> None:
    crs = tmp_path / "tiers.yaml"
    crs.write_text(
        yaml.safe_dump(
            tier(
                "t",
                [
                    backend("cheap", "http://127.0.0.1:1/v1", capabilities={"strength": 30}),
                    backend("strong", "http://127.0.0.1:1/v1", "gpt-4o", (2.5, 10), capabilities={"strength": 90}),
                ],
                access=DEFAULT,
                routing={"strategy": "CostAware"},
            )
        )
    )
    request = tmp_path / "request.json"
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    request.write_text(json.dumps({"model": "x", "messages": messages, "max_tokens": 50}))
    out = subprocess.run(
        [*TIERWISE, "estimate", str(request), "--policy", str(crs), "-o", "json"], capture_output=True, check=True
    )
    got = json.loads(out.stdout)
    tokens = TokenCounter().count_chat("gpt-4o", messages)
    assert got["tier"] == "t" and got["strategy"] == "CostAware" and got["decision"] == "weighted"
    strong = next(b for b in got["backends"] if b["backend"] == "strong")
    assert strong["inputTokens"] == tokens and strong["maxOutputTokens"] == 50
    assert strong["maxCostUsd"] == pytest.approx((tokens * 2.5 + 50 * 10) / 1e6)
    bad = subprocess.run(
        [*TIERWISE, "estimate", str(request), "--policy", str(crs), "--tier", "nope"], capture_output=True, check=False
    )
    assert bad.returncode == 1 and b"nope" in bad.stderr


def test_estimate_of_the_quickstart_says_nothing_of_api_keys_it_does_not_need(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "gold", "messages": [{"role": "user", "content": "hi"}]}))
    quickstart = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
    out = subprocess.run([*TIERWISE, "estimate", str(request), "--policy", str(quickstart)], capture_output=True,
                         check=True)  # fmt: skip
    assert b"tier: gold" in out.stdout
    assert out.stderr == b""  # no warning about the quickstart's Secret, once per backend
