"""The built-in autoscaler end to end: a sidecar under load, scraped by a real Prometheus, makes the
operator scale a tier's Deployment up; without load it scales down after the stabilisation
window; with Prometheus gone it scales nothing down and the tier's status says why."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo_traffic import Workers
from localcluster import Cluster
from promserver import Prometheus, start_prometheus
from tests.conftest import Net, wait_for
from tests.integration.test_operator import apply, condition, get, ready
from tests.operatorproc import OperatorProcess
from tests.servers import CHAT, GatewayServer

pytestmark = pytest.mark.cluster
WINDOW = 12  # scale-down stabilisation, seconds
TARGET = 2  # in-flight requests per replica
CONCURRENCY = 8  # -> ceil(8 / 2) = 4 replicas, the backend's maximum


def chat_tier(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "tierwise.dev/v1alpha1",
        "kind": "InferenceTier",
        "metadata": {"name": "chat", "namespace": namespace},
        "spec": {
            "backends": [
                {
                    "name": "llama",
                    "model": "llama-3.1-8b",
                    "pricing": {"inputPerMillion": 0.05, "outputPerMillion": 0.15},
                    "deployment": {"image": "vllm/vllm-openai:v0.11.0", "replicas": {"min": 1, "max": 4}},
                }
            ],
            "access": {"default": True},
            "autoscaling": {
                "mode": "Builtin",
                "signal": "InFlightPerReplica",
                "target": TARGET,
                "scaleDownStabilizationSeconds": WINDOW,
            },
        },
    }


class Load(Workers):
    """CONCURRENCY callers, each sending one slow request after another, until stopped."""

    def __init__(self, gw: GatewayServer) -> None:
        super().__init__(self._one, CONCURRENCY)
        self.gw = gw
        self.statuses: list[int] = []

    def _one(self, _: int) -> None:
        status, _, _ = self.gw.post("/v1/chat/completions", CHAT)
        self.statuses.append(status)


@pytest.fixture
def scaled(crds: Cluster, namespace: str, net: Net, tmp_path: Path) -> Iterator[tuple[Any, ...]]:
    # Each request takes about 1.5 s at the model server, so the callers keep ~8 in flight.
    fake = net.fake("llama", first_byte_ms=100, per_token_ms=90, completion_tokens=16)
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"chat/llama": [fake.v1]}))
    gw = net.gateway(chat_tier(namespace), namespace=namespace, endpoints=endpoints)
    prom = start_prometheus(tmp_path / "prom", [f"127.0.0.1:{gw.port}"], interval="1s")
    op = OperatorProcess(
        crds, tmp_path / "op", "--prometheus-url", prom.url, "--autoscale-interval", "1", "--slo-interval", "2"
    ).start()
    try:
        yield crds, namespace, gw, prom, op, tmp_path
    finally:
        op.stop()
        prom.stop()


def replicas(c: Cluster, ns: str) -> int:
    return int(get(c, "deployment", "chat-llama", "-n", ns)["spec"]["replicas"])


def test_sidecar_load_scales_the_deployment_up_then_down_and_missing_metrics_hold_it(
    scaled: tuple[Any, ...],
) -> None:
    c, ns, gw, prom, _op, tmp = scaled
    apply(c, ns, chat_tier(ns))
    wait_for("chat Ready with one replica", lambda: ready(c, ns, "chat") and replicas(c, ns) == 1, timeout=90)

    with Load(gw) as load:
        wait_for("scaled up to 4 on in-flight load", lambda: replicas(c, ns) == 4, timeout=60)
        wait_for(
            "4 Running pods",
            lambda: (
                [p["status"].get("phase") for p in get(c, "pods", "-n", ns, "-l", "tierwise.dev/tier=chat")["items"]]
                == ["Running"] * 4
            ),
            timeout=60,
        )
        time.sleep(2)
    assert load.statuses and set(load.statuses) == {200}
    stopped = time.monotonic()
    wait_for("scaled back down to 1", lambda: replicas(c, ns) == 1, timeout=60)
    # Recommendations of 4 were made until the load stopped: none of them may be overruled
    # before the stabilisation window has passed.
    assert time.monotonic() - stopped >= WINDOW - 2
    events = c.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=chat").stdout
    assert "scaled chat-llama from 1 to 4" in events and "scaled chat-llama from 4 to 1" in events

    with Load(gw):
        wait_for("scaled up again", lambda: replicas(c, ns) == 4, timeout=60)
        port = int(prom.url.rsplit(":", 1)[1])
        prom.stop()

    def blind() -> dict[str, Any]:
        t = get(c, "inferencetier", "chat", "-n", ns)
        deg, slo = condition(t, "Degraded"), condition(t, "SLOMet")
        return deg if deg.get("reason") == slo.get("reason") == "MetricsUnavailable" else {}

    deg = wait_for("the status to say metrics are unavailable", blind, timeout=30)
    assert "Prometheus" in deg["message"] and "holding" in deg["message"]
    assert condition(get(c, "inferencetier", "chat", "-n", ns), "SLOMet")["status"] == "Unknown"
    time.sleep(2 * WINDOW)
    assert replicas(c, ns) == 4  # no data is not "no load"

    revived: Prometheus = start_prometheus(tmp / "prom", [f"127.0.0.1:{gw.port}"], interval="1s", port=port)
    try:
        wait_for("scaled down once metrics are back", lambda: replicas(c, ns) == 1, timeout=90)
        seen: list[dict[str, Any]] = []

        def cleared() -> bool:
            seen.append(condition(get(c, "inferencetier", "chat", "-n", ns), "Degraded"))
            return seen[-1].get("status") == "False"

        try:
            wait_for("Degraded cleared", cleared, timeout=60)
        except AssertionError as e:
            raise AssertionError(f"{e}; Degraded: {seen[-1:]}") from None
    finally:
        revived.stop()


def test_keda_mode_renders_a_scaled_object_on_the_same_query(scaled: tuple[Any, ...]) -> None:
    from tests.integration.test_operator import KEDA_CRD

    c, ns, _gw, prom, _op, _tmp = scaled
    c.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(KEDA_CRD))
    c.kubectl("wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=60s")
    try:
        tier = chat_tier(ns)
        tier["spec"]["autoscaling"] = {
            "mode": "KEDA",
            "target": TARGET,
            "schedules": [{"name": "nights", "start": "22:00", "end": "06:00", "minReplicas": 2}],
        }
        apply(c, ns, tier)
        so = wait_for("the ScaledObject", lambda: get(c, "scaledobject", "chat-llama", "-n", ns), timeout=60)
        load, nights = so["spec"]["triggers"]
        assert load["metadata"]["serverAddress"] == prom.url and load["metadata"]["threshold"] == str(TARGET)
        assert load["metadata"]["query"] == (
            f'sum(tierwise_backend_in_flight_requests{{namespace=~"{ns}",tier="chat",backend="llama"}})'
        )
        assert nights["type"] == "cron" and nights["metadata"]["desiredReplicas"] == "2"
        wait_for("chat Ready", lambda: ready(c, ns, "chat"), timeout=90)
        dep = get(c, "deployment", "chat-llama", "-n", ns, "--show-managed-fields")
        ours = [m for m in dep["metadata"]["managedFields"] if m["manager"] == "tierwise-operator"]
        assert ours and all('"f:replicas"' not in json.dumps(m["fieldsV1"].get("f:spec", {})) for m in ours)
    finally:
        c.kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=false", check=False)
