"""Session stickiness over the replicas of a self-hosted backend, and what happens when one dies."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import Net
from tests.servers import CHAT

SELF_HOSTED = {
    "name": "llama",
    "model": "llama-3.1-8b",
    "pricing": {"inputPerMillion": 0.05, "outputPerMillion": 0.15},
    "deployment": {"image": "vllm/vllm-openai:v0.11.0", "replicas": {"min": 3, "max": 3}},
}


def _replicas(net: Net, tmp_path: Path, n: int = 3):  # type: ignore[no-untyped-def]
    fakes = [net.fake(f"replica{i}") for i in range(n)]
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"chat/llama": [f.v1 for f in fakes]}))
    gw = net.gateway(
        {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "InferenceTier",
            "metadata": {"name": "chat", "namespace": "apps"},
            "spec": {
                "backends": [SELF_HOSTED],
                "routing": {"stickiness": {"enabled": True, "ttlSeconds": 600}},
                "access": {"defaultFor": {"names": ["apps"]}},
            },
        },
        namespace="apps",
        endpoints=endpoints,
    )
    return fakes, gw


def _counts(fakes) -> list[int]:  # type: ignore[no-untyped-def]
    return [f.requests for f in fakes]


def test_a_session_stays_on_one_replica_and_moves_once_when_it_dies(net: Net, tmp_path: Path) -> None:
    fakes, gw = _replicas(net, tmp_path)
    client = gw.client()
    for _ in range(100):
        client.chat.completions.create(model="x", messages=CHAT["messages"], extra_headers={"x-tierwise-session": "s1"})
    counts = _counts(fakes)
    assert sorted(counts) == [0, 0, 100], counts
    home = counts.index(100)

    fakes[home].stop_listening()
    for _ in range(50):
        client.chat.completions.create(model="x", messages=CHAT["messages"], extra_headers={"x-tierwise-session": "s1"})
    after = _counts(fakes)
    moved = [after[i] - counts[i] for i in range(3) if i != home]
    # Every request answered; all 50 on one surviving replica: it moved once and stayed.
    assert sorted(moved) == [0, 50], after

    # The dead replica comes back: the session does not bounce back to it.
    fakes[home].start()
    for _ in range(10):
        client.chat.completions.create(model="x", messages=CHAT["messages"], extra_headers={"x-tierwise-session": "s1"})
    assert fakes[home].requests == 100
    _, metrics = gw.get("/metrics")
    assert 'tierwise_session_moves_total{tier="chat"} 1.0' in metrics.decode()


def test_sessions_spread_and_the_openai_user_field_is_a_session(net: Net, tmp_path: Path) -> None:
    fakes, gw = _replicas(net, tmp_path)
    client = gw.client()
    for i in range(60):
        client.chat.completions.create(model="x", messages=CHAT["messages"], user=f"user-{i}")
    counts = _counts(fakes)
    assert sum(counts) == 60 and all(c > 0 for c in counts), counts
    before = _counts(fakes)
    for _ in range(20):
        client.chat.completions.create(model="x", messages=CHAT["messages"], user="user-7")
    grew = [a - b for a, b in zip(_counts(fakes), before, strict=True)]
    assert sorted(grew) == [0, 0, 20]
