"""The chart's Grafana dashboard against real data: a real sidecar serves traffic that exercises
what the panels show (several tiers, streams, tenants, a failing backend and its fallback, a
budget that refuses, a tier under SLO steering), a real Prometheus scrapes it, and every panel's
query must run and return something. A query that errors, or names a metric or label that does
not exist, fails here."""

from __future__ import annotations

import http.client
import json
import subprocess
import urllib.error
from pathlib import Path
from typing import Any

from localcluster import free_port, stop_process
from promserver import start_prometheus
from tests.conftest import TIERWISE, Net, _ready, wait_for
from tests.integration.test_chart import docs_of, one, template
from tierwise.api import parse_object
from tierwise.compiler import compile

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "tierwise" / "dashboards" / "tierwise.json"
PRICE = {"inputPerMillion": 1, "outputPerMillion": 2}


def _objects(urls: dict[str, str]) -> list[dict[str, Any]]:
    def tier(name: str, backends: list[str], **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "InferenceTier",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {
                "backends": [{"name": b, "model": "m", "url": urls[b], "pricing": PRICE} for b in backends],
                "slo": {"firstTokenP95Milliseconds": 1000, "totalP95Milliseconds": 2000},
                **spec,
            },
        }

    def budget(name: str, usd: float, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "CostBudget",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"period": "Monthly", "limit": {"usd": usd}, **spec},
        }

    return [
        tier("gold", ["g1"], fallback={"tier": "silver"}),
        tier("silver", ["s1", "s2"], access={"default": True}),
        tier("bronze", ["b1"]),
        budget("team", 100.0, thresholds=[{"percent": 1, "action": "Notify"}, {"percent": 100, "action": "Reject"}]),
        budget("capped", 0.0002, selector={"tenants": ["capped"]}),  # a few requests, then 429
    ]


def _post(url: str, tier: str, tenant: str, stream: bool) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": tier, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", "x-tierwise-tenant": tenant})  # fmt: skip
        r = conn.getresponse()
        r.read()
        return int(r.status)
    finally:
        conn.close()


def _exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_the_chart_ships_the_dashboard_for_grafanas_sidecar(tmp_path: Path) -> None:
    docs = docs_of(template("tw", "tierwise-system", {"monitoring": {"dashboard": {"enabled": True}}}, tmp_path))
    cm = one(docs, "ConfigMap", "tw-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["tierwise.json"]) == json.loads(DASHBOARD.read_text())


def test_every_panel_query_answers_on_real_sidecar_metrics(net: Net, tmp_path: Path) -> None:
    fakes = {name: net.fake(name, completion_tokens=8) for name in ("g1", "s1", "s2", "b1")}
    fakes["g1"].configure(error_rate=0.6, error_status=500)  # gold fails over to silver often
    resources = [r for o in _objects({n: f.v1 for n, f in fakes.items()}) if (r := parse_object(o)) is not None]
    policy = compile(resources, "apps")  # type: ignore[arg-type]
    folder = tmp_path / "mount"
    folder.mkdir()
    (folder / "policy.json").write_text(json.dumps(policy.wire()))
    # Half of bronze promoted to silver, as the operator's SLO steering would publish it.
    steering = {"bronze": {"weights": {"b1": 1}, "divert": {"to": "silver", "reason": "promoted", "percent": 50}}}
    (folder / "steering.json").write_text(json.dumps({"tiers": steering}))
    port = free_port()
    with (tmp_path / "sidecar.log").open("wb") as log:
        proc = subprocess.Popen(
            [*TIERWISE, "sidecar", "--policy-file", str(folder / "policy.json"), "-n", "apps",
             "--no-discover-endpoints", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prom = start_prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], interval="1s")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the sidecar ready", lambda: _ready(url), 30)
        statuses = []
        for i in range(180):
            tier = ("gold", "silver", "bronze")[i % 3]
            statuses.append(_post(url, tier, "capped" if i % 10 == 0 else "acme", stream=i % 2 == 1))
        assert 429 in statuses and 200 in statuses, statuses
        failed: dict[str, str] = {}
        for title, expr in _exprs():

            def answers(expr: str = expr) -> bool:
                try:
                    return bool(prom.query(expr))
                except urllib.error.HTTPError as e:  # a query Prometheus refuses
                    failed[expr] = e.read().decode()
                    return True

            wait_for(f"panel {title!r}: {expr}", answers, 60, interval=1.0)
        assert not failed, failed
    finally:
        prom.stop()
        stop_process(proc)
