"""The budget controller end to end, in a cluster without Redis: two real sidecars, each with its
own SQLite ledger, scraped by a real Prometheus; the operator reads their spend, writes it into
the CostBudget's status and publishes it beside the Policy, where each sidecar counts it as the
other's spend. Without the publication each sidecar would spend the whole limit.

The ConfigMap reaches the sidecars' files as a kubelet would bring it (a copy of its data, swapped
in whole): kwok's pods run no containers, so the sidecars are local processes.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from configmirror import PolicyMirror
from localcluster import Cluster, free_port, stop_process
from promserver import Prometheus, start_prometheus
from tests.conftest import TIERWISE, Net, _ready, wait_for
from tests.integration.test_budget_processes import _metric
from tests.integration.test_operator import apply, get
from tests.operatorproc import OperatorProcess
from tests.servers import Fake

pytestmark = pytest.mark.cluster
PRICE = (100.0, 400.0)  # USD per million tokens: a request here costs about $0.0074
LIMIT = 1.0
MAX_TOKENS = 16
CLIENTS_PER_SIDECAR = 2
SLO_WINDOW = 30


def objects(ns: str, fake: Fake) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "InferenceTier",
            "metadata": {"name": "gold", "namespace": ns},
            "spec": {
                "backends": [
                    {
                        "name": "main",
                        "model": "gpt-4o",
                        "url": fake.v1,
                        "pricing": {"inputPerMillion": PRICE[0], "outputPerMillion": PRICE[1]},
                    }
                ],
                "access": {"default": True},
                # A short SLO window: the idle test waits for the last traffic to leave it.
                "slo": {"windowSeconds": SLO_WINDOW},
            },
        },
        {
            "apiVersion": "tierwise.dev/v1alpha1",
            "kind": "CostBudget",
            "metadata": {"name": "team", "namespace": ns},
            "spec": {
                "period": "Monthly",
                "limit": {"usd": LIMIT},
                "thresholds": [{"percent": 50, "action": "Notify"}, {"percent": 100, "action": "Reject"}],
            },
        },
    ]


@dataclass
class World:
    cluster: Cluster
    ns: str
    fake: Fake
    prom: Prometheus
    prom_port: int
    op: OperatorProcess
    sidecars: list[str]
    kubelet: PolicyMirror
    workdir: Path


@pytest.fixture(scope="module")
def world(crds: Cluster, tmp_path_factory: pytest.TempPathFactory, aio: Any) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("budgetctl")
    net = Net(aio, tmp)
    ns = f"bud{int(time.time()) % 100000}"
    crds.kubectl("create", "namespace", ns)
    crds.kubectl("label", "namespace", ns, "tierwise.dev/injection=enabled")
    # About half a second per request: four callers spend the limit in some fifteen seconds, a few
    # times the publication's delay.
    fake = net.fake("gold", completion_tokens=MAX_TOKENS, per_token_ms=30)
    ports = [free_port() for _ in range(2)]
    prom_port = free_port()
    prom = start_prometheus(tmp / "prom", [f"127.0.0.1:{p}" for p in ports], interval="1s", port=prom_port)
    op = OperatorProcess(
        crds, tmp / "op", "--prometheus-url", prom.url, "--spend-interval", "1", "--slo-interval", "1"
    ).start()
    procs: list[subprocess.Popen[bytes]] = []
    world: World | None = None
    kubelet = PolicyMirror(crds, ns, tmp / "mount")
    kubelet.folder.mkdir()
    try:
        apply(crds, ns, *objects(ns, fake))
        wait_for("the Policy ConfigMap", lambda: kubelet.sync() or (kubelet.folder / "policy.json").exists(), 60)
        kubelet.thread.start()
        urls = []
        for i, port in enumerate(ports):
            log = (tmp / f"sidecar{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [
                        *TIERWISE,
                        "sidecar",
                        "--policy-file",
                        str(kubelet.folder / "policy.json"),
                        "-n",
                        ns,
                        "--budget-store",
                        f"sqlite:{tmp / f'ledger{i}.sqlite'}",
                        "--no-discover-endpoints",
                        "--port",
                        str(port),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for u in urls:
            wait_for(f"sidecar {u} ready", lambda u=u: _ready(u), 30)
        world = World(crds, ns, fake, prom, prom_port, op, urls, kubelet, tmp)
        yield world
    finally:
        kubelet.stop.set()
        for p in procs:
            stop_process(p)
        op.stop()
        prom.stop()
        if world is not None:
            world.prom.stop()  # a test starts it again
        net.close()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _post(url: str) -> tuple[int, str]:
    body = json.dumps({"model": "gold", "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": MAX_TOKENS}).encode()  # fmt: skip
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return int(r.status), ""
    except urllib.error.HTTPError as e:
        return e.code, str(json.loads(e.read()).get("error", {}).get("code"))


def _has_series(url: str, series: str) -> bool:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return any(line.startswith(series + " ") for line in r.read().decode().splitlines())


def _num(x: float) -> str:
    """A number as kubectl prints a printer column's (the shortest form, no trailing .0)."""
    text = repr(float(x))
    return text.removesuffix(".0")


def _spent(fake: Fake) -> float:
    s = fake.backend.stats
    return sum(s.prompt_tokens.values()) * PRICE[0] / 1e6 + sum(s.completion_tokens.values()) * PRICE[1] / 1e6


def _status(w: World) -> dict[str, Any]:
    return dict((get(w.cluster, "costbudget", "team", "-n", w.ns) or {}).get("status") or {})


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def test_a_cache_policy_s_status_shows_its_entries_and_hit_ratio_from_prometheus(world: World) -> None:
    """First in the module, before the budget is spent (a miss past the limit is refused, not stored)."""
    w = world
    policy = {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CachePolicy",
              "metadata": {"name": "answers", "namespace": w.ns}, "spec": {}}  # fmt: skip
    apply(w.cluster, w.ns, policy)
    ask = {"model": "gold", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 4,
           "temperature": 0}  # fmt: skip

    def cache_header(url: str) -> str:
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(ask).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return str(r.headers.get("x-tierwise-cache", ""))

    series = 'tierwise_cache_lookups_total{cache_namespace="%s",cache_policy="answers",layer="memory",result="hit"}'
    for url in w.sidecars:
        # The Policy with the CachePolicy in force: its series start at 0; Prometheus sees that
        # before the first lookup, so the last hour's increase counts every one.
        wait_for("the cache policy in force", lambda u=url: _has_series(u, series % w.ns), 60)
    time.sleep(2.5)  # two scrapes
    for url in w.sidecars:
        assert [cache_header(url) for _ in range(4)] == ["miss", *["hit; layer=memory"] * 3]
    wait_for(
        "the status from Prometheus",
        # Both sidecars' figures (one alone has the same ratio, and one entry).
        lambda: (
            ((get(w.cluster, "cachepolicy", "answers", "-n", w.ns) or {}).get("status") or {}).get("hitRatio")
            == {"memory": 0.75}
            and get(w.cluster, "cachepolicy", "answers", "-n", w.ns)["status"].get("entries") == 2
        ),
        60,
    )
    status = get(w.cluster, "cachepolicy", "answers", "-n", w.ns)["status"]
    assert status["entries"] == 2 and _condition(status, "Ready")["status"] == "True"
    header, row = w.cluster.kubectl("get", "cachepolicies", "-n", w.ns).stdout.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "SCOPE", "TTL", "ENTRIES", "HIT", "L1"]
    assert row.split()[1:5] == ["Tenant", "3600", "2", "0.75"]


def test_sidecars_without_redis_stop_at_the_limit_together_and_the_status_shows_the_spend(world: World) -> None:
    w = world
    refused: dict[str, int] = {u: 0 for u in w.sidecars}
    statuses: list[int] = []
    stop = threading.Event()
    deadline = time.monotonic() + 120

    def client(url: str) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            status, code = _post(url)
            statuses.append(status)
            if code == "budget_exceeded":
                refused[url] += 1
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(u,)) for u in w.sidecars for _ in range(CLIENTS_PER_SIDECAR)]
    for t in threads:
        t.start()
    wait_for("both sidecars refusing with the budget's code", lambda: all(n >= 3 for n in refused.values()), 120)
    stop.set()
    for t in threads:
        t.join(60)
    assert set(statuses) <= {200, 429}, statuses
    total = _spent(w.fake)
    own = [_metric(u, "tierwise_budget_own_spent_usd") for u in w.sidecars]
    # Each sidecar stopped well before spending the whole limit on its own: the other's spend,
    # published by the operator, counted. Together they passed it by at most what was spent while
    # the publication travelled (scrape, read, ConfigMap, file: a few seconds of this load).
    assert max(own) < 0.8 * LIMIT, own
    assert LIMIT * 0.9 <= total <= LIMIT * 1.35, total
    assert abs(sum(own) - total) < 1e-4, (own, total)

    # The status shows what the providers served, to the micro-dollar, and the state.
    wait_for("status spent equals the backends' usage", lambda: abs(_status(w).get("spentUsd", -1) - total) < 2e-6, 30)
    s = _status(w)
    over = total >= LIMIT  # the last requests may have stopped just short of it, or passed it
    assert (s["state"], s["crossedPercent"]) == (("Exceeded", 100) if over else ("Warning", 50))
    assert s["remainingUsd"] == round(max(LIMIT - total, 0), 6)
    assert s["periodStart"].endswith("T00:00:00Z") and s["lastReset"] == s["periodStart"]
    assert _condition(s, "SpendObserved")["reason"] == "Prometheus"
    header, row = w.cluster.kubectl("get", "costbudgets", "-n", w.ns).stdout.splitlines()[:2]
    assert header.split()[:8] == ["NAME", "PERIOD", "LIMIT", "USD", "SPENT", "USD", "REMAINING", "USD"]
    shown = [_num(LIMIT), _num(s["spentUsd"]), _num(s["remainingUsd"])]
    assert row.split()[1:6] == ["Monthly", *shown, s["state"]]

    # One Event per threshold crossed, once.
    events = json.loads(
        w.cluster.kubectl(
            "get", "events", "-n", w.ns, "--field-selector", "involvedObject.name=team", "-o", "json"
        ).stdout
    )["items"]
    crossed = [e for e in events if e["reason"] == "ThresholdCrossed"]
    expected = [("100", 1), ("50", 1)] if over else [("50", 1)]
    assert sorted((e["message"].split("%")[0][-3:].strip(), e.get("count", 1)) for e in crossed) == expected, crossed

    # The sidecars were sent the same figure, beside the Policy and outside its hash.
    cm = get(w.cluster, "configmap", "tierwise-policy", "-n", w.ns)
    sent = json.loads(cm["data"]["budgets.json"])["budgets"][f"{w.ns}/team"]
    assert sent["spentMicros"] == round(s["spentUsd"] * 1e6) and sent["state"] == s["state"]
    assert json.loads(cm["data"]["policy.json"])["hash"] == cm["metadata"]["annotations"]["tierwise.dev/policy-hash"]


def test_reapplying_the_budget_from_git_changes_nothing_and_the_operator_owns_only_status(world: World) -> None:
    w = world
    before = get(w.cluster, "costbudget", "team", "-n", w.ns)
    budget_doc = json.dumps(objects(w.ns, w.fake)[1])
    diff = w.cluster.kubectl("diff", "--server-side", "--field-manager=tests", "-f", "-", input=budget_doc, check=False)
    assert diff.returncode == 0 and diff.stdout == "", diff.stdout + diff.stderr
    w.cluster.kubectl("apply", "--server-side", "--field-manager=tests", "-f", "-", input=budget_doc)
    after = get(w.cluster, "costbudget", "team", "-n", w.ns, "--show-managed-fields")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    mine = [m for m in after["metadata"]["managedFields"] if m["manager"] == "tierwise-operator"]
    assert mine and all(m.get("subresource") == "status" for m in mine), mine
    assert all(set(m["fieldsV1"]) == {"f:status"} for m in mine)


def test_prometheus_gone_keeps_status_and_what_the_sidecars_were_sent_and_says_stale(world: World) -> None:
    w = world
    s0 = _status(w)
    sent0 = get(w.cluster, "configmap", "tierwise-policy", "-n", w.ns)["data"]["budgets.json"]
    w.prom.stop()
    wait_for(
        "SpendObserved turns False",
        lambda: _condition(_status(w), "SpendObserved").get("reason") == "PrometheusUnavailable",
        30,
    )
    s1 = _status(w)
    c = _condition(s1, "SpendObserved")
    assert c["status"] == "False" and "stale since" in c["message"]
    assert {k: v for k, v in s1.items() if k != "conditions"} == {k: v for k, v in s0.items() if k != "conditions"}
    assert get(w.cluster, "configmap", "tierwise-policy", "-n", w.ns)["data"]["budgets.json"] == sent0
    # Refusals go on: nothing was loosened.
    assert _post(w.sidecars[0]) == (429, "budget_exceeded")
    w.prom = start_prometheus(w.workdir / "prom", [u.removeprefix("http://") for u in w.sidecars], port=w.prom_port)
    wait_for("SpendObserved True again", lambda: _condition(_status(w), "SpendObserved").get("status") == "True", 60)
    assert _status(w)["spentUsd"] == s0["spentUsd"]


def test_an_idle_cluster_costs_no_api_writes(world: World) -> None:
    """Idle: no traffic for longer than the SLO window (what a tier's status reports has stopped
    moving). Every controller keeps running its cycle, once a second; none writes."""
    w = world
    time.sleep(SLO_WINDOW + 5)
    wait_for("the operator idle", w.op.idle, 30)
    time.sleep(3)  # whatever the last cycle queued has been written
    writes = w.op.writes()
    time.sleep(20)  # twenty spend reads and twenty SLO observations
    assert w.op.writes() == writes
