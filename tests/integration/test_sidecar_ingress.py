"""`tierwise sidecar --ingress` as the operator runs it in a model server's pod: a real process on a
Policy compiled by `tierwise compile`, in front of a fake model server, called with the openai SDK."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from localcluster import free_port
from tests.conftest import TIERWISE, Launch, Net, wait_for
from tests.servers import CHAT
from tierwise_sidecar.ingress import ingress_policy
from tierwise_sidecar.policy_source import read_policy

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "models"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _tiers(llama_model: str = LLAMA, keep_llama: bool = True) -> list[dict[str, Any]]:
    """The quickstart's tiers in namespace `models`, silver's llama-8b fronted by a sidecar."""
    docs = list(yaml.safe_load_all((ROOT / "examples" / "quickstart" / "1-tiers.yaml").read_text()))
    for doc in docs:
        doc["metadata"]["namespace"] = NAMESPACE
    silver = next(d for d in docs if d["metadata"]["name"] == "silver")
    llama = next(b for b in silver["spec"]["backends"] if b["name"] == "llama-8b")
    llama["model"] = llama_model
    llama["deployment"]["sidecar"] = True
    if not keep_llama:
        silver["spec"]["backends"].remove(llama)
    return docs


def _compile(folder: Path, docs: list[dict[str, Any]]) -> bytes:
    crs = folder / "tiers.yaml"
    crs.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = subprocess.run(
        [*TIERWISE, "compile", str(crs), "-n", NAMESPACE, "-o", "json"], capture_output=True, check=True, timeout=60
    )
    return out.stdout


def _swap(policy_file: Path, content: bytes) -> None:
    """Replace the file whole, as the kubelet swaps a ConfigMap volume."""
    new = policy_file.with_suffix(".new")
    new.write_bytes(content)
    new.replace(policy_file)


def test_ingress_serves_one_tier_and_backend_through_its_upstream_and_follows_reloads(
    net: Net, tmp_path: Path, launch: Launch
) -> None:
    model_server = net.fake("model-server")
    policy_file = tmp_path / "policy.json"
    policy_file.write_bytes(_compile(tmp_path, _tiers()))
    _, url = launch(
        "sidecar", "--ingress", "silver/llama-8b", "--upstream", model_server.v1,
        "--namespace", NAMESPACE, "--policy-file", str(policy_file), "--reload-interval", "0.2",
    )  # fmt: skip
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    # Naming another tier (header or model) changes nothing: the request is inside silver's replica.
    raw = client.chat.completions.with_raw_response.create(
        model="gold", messages=CHAT["messages"], extra_headers={"x-tierwise-tier": "gold"}
    )
    assert raw.parse().choices[0].message.content
    assert (raw.headers["x-tierwise-tier"], raw.headers["x-tierwise-backend"]) == ("silver", "llama-8b")
    assert model_server.backend.stats.models == {LLAMA: 1}
    assert [m.id for m in client.models.list()] == ["silver"]
    _, metrics = _get(url + "/metrics")
    # The callers' sidecars count attempts to this backend; counting them here too would double
    # the autoscaler's signal.
    assert "tierwise_backend_in_flight_requests" not in metrics
    served = [line for line in metrics.splitlines() if line.startswith("tierwise_requests_total{")]
    assert served and all('backend="llama-8b"' in line for line in served)

    # A new Policy is narrowed again: the new model name reaches the same upstream.
    _swap(policy_file, _compile(tmp_path, _tiers(llama_model="llama-next")))
    expected = ingress_policy(read_policy(policy_file), "silver", "llama-8b").hash
    wait_for("the new Policy", lambda: expected in _get(url + "/readyz")[1], timeout=10)
    client.chat.completions.create(model="silver", messages=CHAT["messages"])
    assert model_server.backend.stats.models == {LLAMA: 1, "llama-next": 1}

    # A Policy without the backend is refused; the one in force keeps serving.
    _swap(policy_file, _compile(tmp_path, _tiers(llama_model="llama-next", keep_llama=False)))
    wait_for("the refusal", lambda: 'tierwise_policy_reloads_total{result="refused"} 1.0' in _get(url + "/metrics")[1])
    assert expected in _get(url + "/readyz")[1]
    client.chat.completions.create(model="silver", messages=CHAT["messages"])
    assert model_server.backend.stats.models == {LLAMA: 1, "llama-next": 2}


def test_ingress_hands_a_failure_back_without_retry_or_fallback(net: Net, tmp_path: Path, launch: Launch) -> None:
    model_server = net.fake("model-server", error_rate=1.0, error_status=500)
    policy_file = tmp_path / "policy.json"
    policy_file.write_bytes(_compile(tmp_path, _tiers()))
    _, url = launch(
        "sidecar", "--ingress", "silver/llama-8b", "--upstream", model_server.v1,
        "--namespace", NAMESPACE, "--policy-file", str(policy_file),
    )  # fmt: skip
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="silver", messages=CHAT["messages"])
    # silver falls back to bronze, but that is the calling sidecar's move; so is the retry.
    assert e.value.status_code == 502 and e.value.code == "upstream_failed"
    assert model_server.requests == 1
    _, metrics = _get(url + "/metrics")
    assert "tierwise_fallbacks_total{" not in metrics


def test_ingress_waits_unready_for_a_policy_that_declares_its_backend(net: Net, tmp_path: Path) -> None:
    """The Deployment can be up before the operator's ConfigMap names the backend: the ingress
    stays unready (no traffic) and starts serving once the Policy has it."""
    model_server = net.fake("model-server")
    policy_file = tmp_path / "policy.json"
    policy_file.write_bytes(_compile(tmp_path, _tiers(keep_llama=False)))
    port = free_port()
    log_path = tmp_path / "ingress.log"
    proc = subprocess.Popen(
        [*TIERWISE, "sidecar", "--ingress", "silver/llama-8b", "--upstream", model_server.v1, "--namespace", NAMESPACE,
         "--policy-file", str(policy_file), "--reload-interval", "0.2", "--port", str(port)],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the ingress to answer", lambda: _get(url + "/healthz")[0] == 200 or proc.poll() is not None)
        assert proc.poll() is None, log_path.read_text()
        assert _get(url + "/readyz") == (503, '{"status": "no policy"}')
        assert "tier silver has no backend 'llama-8b'" in log_path.read_text()
        _swap(policy_file, _compile(tmp_path, _tiers()))
        wait_for("the ingress to be ready", lambda: _get(url + "/readyz")[0] == 200, timeout=10)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(model="silver", messages=CHAT["messages"]).choices
        assert model_server.requests == 1
    finally:
        proc.kill()
        proc.wait(10)


def test_ingress_holds_its_replica_to_its_concurrency_and_serves_low_priority_last(
    net: Net, tmp_path: Path, launch: Launch
) -> None:
    model_server = net.fake("model-server", first_byte_ms=300, completion_tokens=2)
    docs = _tiers()
    silver = next(d for d in docs if d["metadata"]["name"] == "silver")
    llama = next(b for b in silver["spec"]["backends"] if b["name"] == "llama-8b")
    llama["deployment"]["maxConcurrencyPerReplica"] = 1
    policy_file = tmp_path / "policy.json"
    policy_file.write_bytes(_compile(tmp_path, docs))
    _, url = launch(
        "sidecar", "--ingress", "silver/llama-8b", "--upstream", model_server.v1,
        "--namespace", NAMESPACE, "--policy-file", str(policy_file),
    )  # fmt: skip

    async def burst() -> list[tuple[str, int]]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30.0)
        order: list[tuple[str, int]] = []

        async def call(name: str, priority: str) -> None:
            raw = await client.chat.completions.with_raw_response.create(
                model="silver", messages=CHAT["messages"], extra_headers={"x-tierwise-priority": priority}
            )
            order.append((name, int(raw.headers["x-tierwise-queue-wait-ms"])))

        first = asyncio.create_task(call("first", "normal"))
        await asyncio.sleep(0.1)
        low = asyncio.create_task(call("low", "low"))
        await asyncio.sleep(0.05)
        normal = asyncio.create_task(call("normal", "normal"))
        await asyncio.gather(first, low, normal)
        await client.close()
        return order

    order = asyncio.run(burst())
    # One at a time in the model server, whatever the callers send; the low one waited longest.
    assert model_server.backend.stats.max_in_flight == 1
    assert [name for name, _ in order] == ["first", "normal", "low"]
    assert order[0][1] == 0 and order[2][1] > order[1][1] > 0
