"""The demo's traffic act, in the cluster demo.sh has started (operator reading Prometheus, webhook,
Prometheus scraping the sidecar's metrics port): an application pod gets the sidecar injected,
its traffic flows through that sidecar, an SLO breach steers it, a budget crosses its
thresholds, and the Grafana dashboard's queries are answered by Prometheus.

No container runtime runs here (kwok only pretends pods run), so this script does the kubelet's
part for the injected sidecar container: its command line and environment are taken from the pod
as the webhook patched it, its volumes are local folders, and the Policy ConfigMap is mirrored
into the policy volume as the kubelet would project it. No provider is reachable either: the
tiers of namespace `shop` point at three fake OpenAI-compatible providers on loopback.

Every wait is bounded; a claim that does not happen exits non-zero with what was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from configmirror import PolicyMirror
from demo_traffic import Providers, Traffic, ask, step
from localcluster import Cluster, ClusterError, free_port, stop_process
from promserver import query

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "tierwise" / "dashboards" / "tierwise.json"
NS = "shop"
TIERWISE = [sys.executable, "-m", "tierwise_cli"]
# The injected sidecar's volumes, and where this script keeps them.
VOLUMES = {"/etc/tierwise/policy": "policy", "/var/lib/tierwise": "state", "/var/cache/tierwise": "cache",
           "/tmp": "tmp"}  # fmt: skip
APP_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "shop-app", "namespace": NS, "annotations": {"tierwise.dev/openai-base-url": "true"}},
    "spec": {"containers": [{"name": "app", "image": "example/shop:1"}]},
}  # fmt: skip
# A volume's path where it starts a value or follows = or : (not inside another path).
MOUNTED = re.compile(r"(?<![\w/.])(" + "|".join(re.escape(m) for m in VOLUMES) + r")(?=/|$)")
T = TypeVar("T")


class DemoFailedError(RuntimeError):
    pass


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise DemoFailedError(f"{what}: not seen within {timeout:.0f} s")
        time.sleep(interval)


def objects(providers: Providers) -> str:
    """Namespace shop: gold on two providers of one model, silver on a cheap one, a budget for
    the promo-bot tenant with staged thresholds over a rolling day (a calendar day would reset
    if the demo ran across midnight), a referenced tier first (the webhook judges each object of
    an apply on its own)."""
    price = {"inputPerMillion": 2.5, "outputPerMillion": 10}
    gold = [{"name": n, "model": "gpt-4o", "url": providers.url(n), "weight": 50, "pricing": price}
            for n in ("openai-4o", "azure-4o")]  # fmt: skip
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": NS, "labels": {"tierwise.dev/injection": "enabled"}}},
        {"apiVersion": "tierwise.dev/v1alpha1", "kind": "InferenceTier",
         "metadata": {"name": "silver", "namespace": NS},
         "spec": {"access": {"default": True}, "slo": {"firstTokenP95Milliseconds": 1000, "totalP95Milliseconds": 3000,
                                                     "windowSeconds": 30},
                  "backends": [{"name": "mini", "model": "gpt-4o-mini", "url": providers.url("mini"),
                                "pricing": {"inputPerMillion": 0.15, "outputPerMillion": 0.6}}]}},
        {"apiVersion": "tierwise.dev/v1alpha1", "kind": "InferenceTier", "metadata": {"name": "gold", "namespace": NS},
         "spec": {"priority": 100, "backends": gold, "fallback": {"tier": "silver"},
                  "slo": {"firstTokenP95Milliseconds": 300, "totalP95Milliseconds": 3000, "windowSeconds": 30}}},
        {"apiVersion": "tierwise.dev/v1alpha1", "kind": "CostBudget",
         "metadata": {"name": "promo-bot", "namespace": NS},
         "spec": {"selector": {"tenants": ["promo-bot"]}, "period": "Rolling24Hours", "limit": {"usd": 0.02},
                  "thresholds": [{"percent": 50, "action": "Notify"},
                                 {"percent": 80, "action": "Downgrade", "downgradeTo": "silver"},
                                 {"percent": 100, "action": "Reject"}]}},
    ]  # fmt: skip
    return "\n---\n".join(json.dumps(d) for d in docs)


def injected_command(
    pod: dict[str, Any], workdir: Path, api_port: int, metrics_port: int
) -> tuple[list[str], dict[str, str]]:
    """The injected sidecar container's command and environment, as the kubelet would run it
    here: $(VAR) references resolved from the pod, volumes as local folders, the ports free ones
    on loopback, endpoint discovery off (namespace shop has no self-hosted backend)."""
    spec = pod["spec"]
    container = next(
        c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == "tierwise-sidecar"
    )
    fields = {"metadata.namespace": pod["metadata"]["namespace"], "metadata.name": pod["metadata"]["name"],
              "spec.serviceAccountName": spec.get("serviceAccountName", "default")}  # fmt: skip
    env: dict[str, str] = {}
    for e in container.get("env", []):
        ref = (e.get("valueFrom") or {}).get("fieldRef")
        env[e["name"]] = fields[ref["fieldPath"]] if ref else str(e.get("value", ""))

    def local(text: str) -> str:
        # One pass: a folder mapped under /tmp is not mapped again.
        text = MOUNTED.sub(lambda m: str(workdir / VOLUMES[m.group(1)]), text)
        for name, value in env.items():
            text = text.replace(f"$({name})", value)
        return text

    swapped = {"--discover-endpoints": "--no-discover-endpoints"}
    args = []
    for a in container["args"]:
        if a.startswith("--port="):
            args.append(f"--port={api_port}")
        elif a.startswith("--health-port="):
            args.append(f"--health-port={metrics_port}")
        else:
            args.append(local(swapped.get(a, a)))
    env = {k: local(v) for k, v in env.items()}
    return args, env


def run_sidecar(
    cluster: Cluster, workdir: Path, metrics_port: int
) -> tuple[subprocess.Popen[bytes], str, PolicyMirror]:
    for folder in VOLUMES.values():
        (workdir / folder).mkdir(parents=True, exist_ok=True)
    mirror = PolicyMirror(cluster, NS, workdir / "policy")
    wait_for("the Policy ConfigMap of namespace shop", mirror.sync, 60)
    mirror.thread.start()
    pod = json.loads(cluster.kubectl("get", "pod", "shop-app", "-n", NS, "-o", "json").stdout)
    api_port = free_port()
    args, env = injected_command(pod, workdir, api_port, metrics_port)
    print("the injected container runs: tierwise " + " ".join(args))
    print("with env: " + ", ".join(f"{k}={v}" for k, v in sorted(env.items())))
    log = (workdir / "sidecar.log").open("wb")
    proc = subprocess.Popen([*TIERWISE, *args], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{api_port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise DemoFailedError(f"the sidecar exited ({proc.returncode}); see {workdir / 'sidecar.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for("the sidecar ready", ready, 60)
    return proc, url, mirror


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", *args, "-n", NS, "-o", "json").stdout))


def slo_breach(cluster: Cluster, providers: Providers, url: str) -> None:
    step("an SLO breach steers traffic: openai-4o turns slow (600 ms to the first token; gold's SLO is 300 ms at p95)")
    with Traffic(url, tier="gold", tenant="web") as traffic:
        wait_for("gold traffic on both providers", lambda: providers.requests("openai-4o") > 20
                 and providers.requests("azure-4o") > 20, 60)  # fmt: skip
        providers.configure("openai-4o", first_byte_ms=600)
        t0 = time.monotonic()

        def drained() -> bool:
            weights = (get(cluster, "inferencetier", "gold").get("status") or {}).get("routingWeights") or {}
            return weights.get("openai-4o") == 0

        wait_for("the operator draining openai-4o (its p95 from Prometheus over the SLO)", drained, 150, 1.0)
        print(f"the operator drained openai-4o after {time.monotonic() - t0:.0f} s of slow answers")
        time.sleep(3)  # the published steering reaches the sidecar through the mirrored ConfigMap
        slow, fast, served = providers.requests("openai-4o"), providers.requests("azure-4o"), traffic.ok
        time.sleep(5)
        moved = providers.requests("azure-4o") - fast, providers.requests("openai-4o") - slow, traffic.ok - served
        print(f"the next 5 s: {moved[2]} answers, azure-4o served {moved[0]}, openai-4o {moved[1]}")
        if moved[1] != 0 or moved[0] == 0:
            raise DemoFailedError(f"traffic did not leave the slow provider: {moved}")
    failed = ", ".join(f"{n} x {code}" for code, n in sorted(traffic.failed.items())) or "none"
    print(f"gold's callers: {traffic.ok} answers, failures: {failed} (slow tries are retried on azure-4o or silver)")
    providers.configure("openai-4o", first_byte_ms=40)
    print(cluster.kubectl("get", "inferencetier", "-n", NS, "-o", "wide").stdout)
    columns = "custom-columns=OBJECT:.involvedObject.name,MESSAGE:.message"
    events = cluster.kubectl("get", "events", "-n", NS, "--field-selector", "reason=Steered",
                             "--sort-by=.lastTimestamp", "-o", columns).stdout  # fmt: skip
    print(events)
    print("(the operator gives openai-4o back once its answers are fast again: not waited for here)")


def budget_thresholds(cluster: Cluster, url: str) -> None:
    step("a budget crosses its thresholds: tenant promo-bot may spend 0.02 USD in any 24 hours "
         "(Notify 50 %, Downgrade 80 % to silver, Reject 100 %)")  # fmt: skip
    seen: list[str] = []
    for i in range(1, 801):
        got = ask(url, tier="gold", tenant="promo-bot")
        if got.status != 200:
            retry = got.headers.get("retry-after")
            print(f"request {i:3}: {got.status} {got.code}: {got.message} (Retry-After {retry} s)")
            seen.append(got.code or str(got.status))
            break
        h = got.headers
        downgraded = h.get("x-tierwise-downgraded-from")
        mark = h.get("x-tierwise-budget-state", "") + (f", downgraded from {downgraded}" if downgraded else "")
        if not seen or seen[-1] != mark:
            print(f"request {i:3}: {got.status} {mark}: served by {h.get('x-tierwise-tier')}; remaining "
                  f"{h.get('x-tierwise-budget-remaining-usd')} USD")  # fmt: skip
            seen.append(mark)
    text = " ".join(seen)
    for claim in ("=Warning", "=Downgraded, downgraded from gold", "budget_exceeded"):
        if claim not in text:
            raise DemoFailedError(f"the budget did not reach {claim}: {seen}")

    seen_status: list[dict[str, Any]] = [{}]

    def caught_up() -> bool:
        # What the sidecar spent, read back from Prometheus by the operator: past the Downgrade
        # threshold, as the sidecar saw it.
        status = seen_status[0] = get(cluster, "costbudget", "promo-bot").get("status") or {}
        return float(status.get("spentUsd") or 0) >= 0.016 and status.get("state") in ("Downgraded", "Exceeded")

    try:
        wait_for("the CostBudget status with the spend (the operator reads it from Prometheus)", caught_up, 90, 1.0)
    except DemoFailedError as e:
        raise DemoFailedError(f"{e}; its status: {json.dumps(seen_status[0])}") from None
    print(cluster.kubectl("get", "tierwise", "-n", NS).stdout)


def dashboard(prometheus: str) -> None:
    step("the Grafana dashboard's queries (charts/tierwise/dashboards/tierwise.json) answered by Prometheus")
    targets = [(p["title"], t["expr"]) for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    answered: dict[str, int] = {}
    deadline = time.monotonic() + 15  # a counter born a moment ago needs a second scrape for rate()
    while True:
        for title, expr in targets:
            if expr in answered:
                continue
            try:
                series = query(prometheus, expr)
            except OSError as e:
                raise DemoFailedError(f"panel {title!r}: Prometheus refused its query: {e}") from None
            if series:
                answered[expr] = len(series)
        if len(answered) == len(targets) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for title, expr in targets:
        got = answered.get(expr)
        print(f"  {title[:60]:<60} " + (f"{got:3} series" if got else "no data: nothing of that kind happened here"))
    print(f"{len(answered)} of the dashboard's {len(targets)} queries answered with data, none refused")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus", required=True, help="the URL of the Prometheus the operator reads")
    p.add_argument("--metrics-port", type=int, required=True, help="where that Prometheus scrapes the sidecar")
    p.add_argument("--workdir", type=Path, required=True)
    args = p.parse_args(argv)
    cluster = Cluster(kubeconfig=Path(os.environ["KUBECONFIG"]))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    proc = mirror = None
    with Providers(args.workdir) as providers:
        try:
            step("namespace shop: gold on two providers of gpt-4o, silver on gpt-4o-mini, a budget for "
                 "tenant promo-bot (fake providers on loopback)")  # fmt: skip
            print(cluster.kubectl("apply", "-f", "-", input=objects(providers)).stdout.strip())
            cluster.kubectl("wait", "--for=condition=Ready", "--timeout=90s", "inferencetier", "--all", "-n", NS)
            step("the application pod: the webhook injects the sidecar; run here as the kubelet would run it")
            cluster.kubectl("create", "-f", "-", input=json.dumps(APP_POD))
            proc, url, mirror = run_sidecar(cluster, args.workdir, args.metrics_port)
            step("traffic through the injected sidecar (the openai SDK, as the app would call OPENAI_BASE_URL)")
            for tier, tenant in (("gold", "web"), ("silver", "web"), ("gold", "promo-bot")):
                got = ask(url, tier=tier, tenant=tenant)
                h = got.headers
                served = f"{h.get('x-tierwise-tier')}/{h.get('x-tierwise-backend')} ({h.get('x-tierwise-model')})"
                print(f"{tier:<6} {tenant:<9} -> {got.status} served by {served}, cost {h.get('x-tierwise-cost-usd')} "
                      f"USD, budgets {h.get('x-tierwise-budget-state', '-')}")  # fmt: skip
                if got.status != 200:
                    raise DemoFailedError(f"a first request failed: {got.status} {got.code}: {got.message}")
            slo_breach(cluster, providers, url)
            budget_thresholds(cluster, url)
            dashboard(args.prometheus)
        except (DemoFailedError, ClusterError) as e:
            print(f"demo: {e}", file=sys.stderr)
            return 1
        finally:
            if mirror is not None:
                mirror.stop.set()
            if proc is not None:
                stop_process(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
